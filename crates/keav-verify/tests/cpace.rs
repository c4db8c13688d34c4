//! The CPace backend through the public API.

mod common;

use common::{binding, run_pair, start, End, TestRng};
use keav_verify::{Backend, Binding, Error, Role, VerifySecret};

const CP: Backend = Backend::CPace;

#[test]
fn equal_inputs_succeed_with_same_key() {
    let mut rng = TestRng::new(b"cp-equal");
    let s = VerifySecret::from("483-219");
    let b = binding(1);
    let pair = run_pair(CP, (&b, Some(&s)), (&b, Some(&s)), &mut rng);
    assert_eq!((pair.i_end, pair.r_end), (End::Equal, End::Equal));
    let lens: Vec<usize> = pair.transcript.iter().map(Vec::len).collect();
    assert_eq!(lens, vec![32, 64, 32]);
    let ki = pair.initiator.key().expect("initiator key");
    let kr = pair.responder.key().expect("responder key");
    assert_eq!(ki, kr);
    assert_ne!(ki, &[0u8; 32]);
    assert!(pair.initiator.is_bound() && pair.responder.is_bound());
    assert_eq!(pair.initiator.backend(), Backend::CPace);
}

#[test]
fn readiness_follows_the_documented_flow() {
    let mut rng = TestRng::new(b"cp-flow");
    let b = binding(2);
    let s = VerifySecret::from("x");
    let (mut i, ya) = start(CP, Role::Initiator, &b, Some(&s), &mut rng);
    let (mut r, none) = start(CP, Role::Responder, &b, Some(&s), &mut rng);
    assert!(none.is_none());
    assert!(!i.ready_for_confirm() && !r.ready_for_confirm());
    assert!(i.key().is_none() && r.key().is_none());
    let m2 = r.receive(&ya.unwrap(), &mut rng).unwrap().unwrap();
    // The responder may send Confirm1 now, but has not seen Ta yet.
    assert!(r.ready_for_confirm() && !r.is_finished());
    assert!(r.key().is_some());
    let ta = i.receive(&m2, &mut rng).unwrap().unwrap();
    assert!(i.ready_for_confirm() && i.is_finished());
    assert_eq!(i.key(), r.key());
    assert_eq!(r.receive(&ta, &mut rng), Ok(None));
    assert!(r.is_finished());
    // Later messages are unexpected but do not undo the result.
    assert_eq!(r.receive(&ta, &mut rng), Err(Error::Unexpected));
    assert_eq!(i.receive(&m2, &mut rng), Err(Error::Unexpected));
    assert!(r.is_finished() && i.is_finished());
    assert_eq!(i.key(), r.key());
}

#[test]
fn different_secret_is_not_equal() {
    let mut rng = TestRng::new(b"cp-diff");
    let b = binding(1);
    let pair = run_pair(
        CP,
        (&b, Some(&VerifySecret::from("1234"))),
        (&b, Some(&VerifySecret::from("1243"))),
        &mut rng,
    );
    // The initiator learns it from Tb and stops; the responder never gets Ta.
    assert_eq!(pair.i_end, End::Failed(Error::NotEqual));
    assert_eq!(pair.r_end, End::Incomplete);
    assert_eq!(pair.transcript.len(), 2);
    assert!(pair.initiator.key().is_none());
    assert!(!pair.responder.is_finished());
}

#[test]
fn wrong_ta_is_not_equal_for_the_responder() {
    let mut rng = TestRng::new(b"cp-ta");
    let b = binding(1);
    let s = VerifySecret::from("1234");
    let (mut i, ya) = start(CP, Role::Initiator, &b, Some(&s), &mut rng);
    let (mut r, _) = start(CP, Role::Responder, &b, Some(&s), &mut rng);
    let m2 = r.receive(&ya.unwrap(), &mut rng).unwrap().unwrap();
    let mut ta = i.receive(&m2, &mut rng).unwrap().unwrap();
    ta[31] ^= 1;
    assert_eq!(r.receive(&ta, &mut rng), Err(Error::NotEqual));
    assert!(!r.is_finished() && !r.ready_for_confirm());
    assert!(r.key().is_none(), "the key is forgotten after a failure");
    assert_eq!(r.receive(&ta, &mut rng), Err(Error::Unexpected));
}

#[test]
fn wrong_tb_is_not_equal_for_the_initiator() {
    let mut rng = TestRng::new(b"cp-tb");
    let b = binding(1);
    let s = VerifySecret::from("1234");
    let (mut i, ya) = start(CP, Role::Initiator, &b, Some(&s), &mut rng);
    let (mut r, _) = start(CP, Role::Responder, &b, Some(&s), &mut rng);
    let mut m2 = r.receive(&ya.unwrap(), &mut rng).unwrap().unwrap();
    m2[40] ^= 0x10;
    assert_eq!(i.receive(&m2, &mut rng), Err(Error::NotEqual));
    assert!(i.key().is_none());
    // Tb and Ta are not interchangeable (reflection).
    let (mut i, ya) = start(CP, Role::Initiator, &b, Some(&s), &mut rng);
    let (mut r, _) = start(CP, Role::Responder, &b, Some(&s), &mut rng);
    let m2 = r.receive(&ya.unwrap(), &mut rng).unwrap().unwrap();
    assert_eq!(r.receive(&m2[32..], &mut rng), Err(Error::NotEqual));
    assert!(i.receive(&m2, &mut rng).is_ok());
}

#[test]
fn different_binding_is_not_equal() {
    let mut rng = TestRng::new(b"cp-binding");
    let s = VerifySecret::from("1234");
    let b1 = Binding::new(&[9u8; 32], b"ZIDi ZIDr total_hash 1");
    let b2 = Binding::new(&[9u8; 32], b"ZIDi ZIDr total_hash 2");
    let b3 = Binding::new(&[8u8; 32], b"ZIDi ZIDr total_hash 1");
    for (x, y) in [(&b1, &b2), (&b1, &b3), (&binding(1), &binding(2))] {
        let pair = run_pair(CP, (x, Some(&s)), (y, Some(&s)), &mut rng);
        assert_eq!(pair.i_end, End::Failed(Error::NotEqual));
        assert!(!pair.responder.is_finished());
    }
}

#[test]
fn identity_and_invalid_points_are_rejected() {
    let y_i1: [u8; 32] =
        hex::decode("2b3c6b8c4f3800e7aef6864025b4ed79bd599117e427c41bd47d93d654b4a51c")
            .unwrap()
            .try_into()
            .unwrap();
    let b = binding(1);
    let mut rng = TestRng::new(b"cp-points");
    for bad in [[0u8; 32], y_i1] {
        let (mut r, _) = start(CP, Role::Responder, &b, None, &mut rng);
        assert_eq!(r.receive(&bad, &mut rng), Err(Error::InvalidPoint));
        assert!(!r.ready_for_confirm() && r.key().is_none());
        let (mut i, _) = start(CP, Role::Initiator, &b, None, &mut rng);
        let mut m2 = bad.to_vec();
        m2.extend_from_slice(&[7u8; 32]);
        assert_eq!(i.receive(&m2, &mut rng), Err(Error::InvalidPoint));
    }
}

#[test]
fn wrong_lengths_are_malformed() {
    let b = binding(1);
    let mut rng = TestRng::new(b"cp-len");
    for len in [0usize, 1, 31, 33, 63, 64, 65, 96] {
        let (mut r, _) = start(CP, Role::Responder, &b, None, &mut rng);
        assert!(
            matches!(
                r.receive(&vec![1u8; len], &mut rng),
                Err(Error::Malformed(_))
            ),
            "{len}"
        );
    }
    for len in [0usize, 32, 63, 65, 96] {
        let (mut i, _) = start(CP, Role::Initiator, &b, None, &mut rng);
        assert!(
            matches!(
                i.receive(&vec![1u8; len], &mut rng),
                Err(Error::Malformed(_))
            ),
            "{len}"
        );
    }
    for len in [0usize, 31, 33, 64] {
        let (_, ya) = start(CP, Role::Initiator, &b, None, &mut rng);
        let (mut r, _) = start(CP, Role::Responder, &b, None, &mut rng);
        r.receive(&ya.unwrap(), &mut rng).unwrap();
        assert!(
            matches!(
                r.receive(&vec![1u8; len], &mut rng),
                Err(Error::Malformed(_))
            ),
            "{len}"
        );
    }
}

#[test]
fn unbound_run_succeeds_but_reports_unbound() {
    let mut rng = TestRng::new(b"cp-unbound");
    let b = binding(5);
    let pair = run_pair(CP, (&b, None), (&b, None), &mut rng);
    assert_eq!((pair.i_end, pair.r_end), (End::Equal, End::Equal));
    assert!(!pair.initiator.is_bound() && !pair.responder.is_bound());
    // An empty secret is the same input as no secret (PRS = b""), but bound.
    let empty = VerifySecret::new(Vec::new());
    let pair = run_pair(CP, (&b, None), (&b, Some(&empty)), &mut rng);
    assert_eq!((pair.i_end, pair.r_end), (End::Equal, End::Equal));
    assert!(pair.responder.is_bound() && !pair.initiator.is_bound());
}

#[test]
fn fresh_randomness_every_run() {
    let mut rng = TestRng::new(b"cp-fresh");
    let b = binding(1);
    let s = VerifySecret::from("1");
    let p1 = run_pair(CP, (&b, Some(&s)), (&b, Some(&s)), &mut rng);
    let p2 = run_pair(CP, (&b, Some(&s)), (&b, Some(&s)), &mut rng);
    assert_ne!(p1.transcript[0], p2.transcript[0]);
    assert_ne!(p1.initiator.key(), p2.initiator.key());
}

#[test]
fn wire_ids() {
    assert_eq!(Backend::CPace.wire_id(), *b"KVCP");
    assert_eq!(Backend::Smp.wire_id(), *b"KVSM");
    for b in [Backend::CPace, Backend::Smp] {
        assert_eq!(Backend::from_wire_id(&b.wire_id()), Some(b));
    }
    assert_eq!(Backend::from_wire_id(b"KVXX"), None);
    assert_eq!(Backend::from_wire_id(b"S256"), None);
}
