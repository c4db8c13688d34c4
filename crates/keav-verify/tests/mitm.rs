//! An active man in the middle (Mallory) holds both Diffie-Hellman results, so
//! he knows the binding of each leg; he lacks the verification secret.

mod common;

use common::{binding, deliver, start, End, TestRng};
use keav_verify::{Backend, Error, Role, Verifier, VerifySecret};

/// Mallory terminates both legs: Alice (initiator) ↔ Mallory (responder) with
/// binding 1, Mallory (initiator) ↔ Bob (responder) with binding 2. He runs an
/// honest-looking test on each leg with his own `guess`; when his own side of a
/// leg fails, he still sends whatever he can (random bytes of the right length)
/// so that the honest party gets a result.
fn mitm(
    backend: Backend,
    secret: Option<&VerifySecret>,
    guess: Option<&VerifySecret>,
    rng: &mut TestRng,
) -> (End, End, Verifier, Verifier) {
    let (b_am, b_mb) = (binding(1), binding(2));
    let (alice, bob) = (
        leg(backend, &b_am, secret, guess, Role::Initiator, rng),
        leg(backend, &b_mb, guess, secret, Role::Responder, rng),
    );
    (alice.0, bob.0, alice.1, bob.1)
}

/// Run one leg; `honest_role` says which side is the honest party. Returns the
/// honest party's end and verifier.
fn leg(
    backend: Backend,
    b: &keav_verify::Binding,
    i_secret: Option<&VerifySecret>,
    r_secret: Option<&VerifySecret>,
    honest_role: Role,
    rng: &mut TestRng,
) -> (End, Verifier) {
    let (mut i, first) = start(backend, Role::Initiator, b, i_secret, rng);
    let (mut r, _) = start(backend, Role::Responder, b, r_secret, rng);
    let (mut i_end, mut r_end) = (End::Incomplete, End::Incomplete);
    let mut next = first;
    let mut to_r = true;
    let mut expected_len = [32usize, 64, 32, 0];
    if backend == Backend::Smp {
        expected_len = [192, 352, 256, 96];
    }
    for len in expected_len {
        if len == 0 {
            break;
        }
        let msg = match next.take() {
            Some(m) => m,
            None => {
                // The sender is done or failed; if it is Mallory, he sends garbage.
                let sender_is_mallory = (to_r && honest_role == Role::Responder)
                    || (!to_r && honest_role == Role::Initiator);
                let sender_end = if to_r { i_end } else { r_end };
                if !sender_is_mallory || sender_end == End::Incomplete {
                    break;
                }
                let mut g = vec![0u8; len];
                rand_core::RngCore::fill_bytes(rng, &mut g);
                g
            }
        };
        next = if to_r {
            deliver(&mut r, &msg, &mut r_end, rng)
        } else {
            deliver(&mut i, &msg, &mut i_end, rng)
        };
        to_r = !to_r;
    }
    match honest_role {
        Role::Initiator => (i_end, i),
        Role::Responder => (r_end, r),
    }
}

#[test]
fn mitm_without_secret_fails_cpace_on_both_sides() {
    let mut rng = TestRng::new(b"mitm-cp");
    let secret = VerifySecret::from("7391");
    for guess in ["0000", "7392", ""] {
        let g = VerifySecret::from(guess);
        let (a, b, va, vb) = mitm(Backend::CPace, Some(&secret), Some(&g), &mut rng);
        assert_eq!(a, End::Failed(Error::NotEqual), "Alice, guess {guess:?}");
        assert_eq!(b, End::Failed(Error::NotEqual), "Bob, guess {guess:?}");
        assert!(!va.is_finished() && !vb.is_finished());
        assert!(va.key().is_none() && vb.key().is_none());
    }
    // Guessing "no secret" at all fails the same way.
    let (a, b, _, _) = mitm(Backend::CPace, Some(&secret), None, &mut rng);
    assert_eq!(
        (a, b),
        (End::Failed(Error::NotEqual), End::Failed(Error::NotEqual))
    );
}

#[test]
fn mitm_without_secret_fails_smp_on_both_sides() {
    let mut rng = TestRng::new(b"mitm-smp");
    let secret = VerifySecret::from("7391");
    for guess in [
        Some(VerifySecret::from("0000")),
        Some(VerifySecret::from("7390")),
        None,
    ] {
        let (a, b, va, vb) = mitm(Backend::Smp, Some(&secret), guess.as_ref(), &mut rng);
        assert_eq!(a, End::Failed(Error::NotEqual), "Alice");
        assert_eq!(b, End::Failed(Error::NotEqual), "Bob");
        assert!(!va.is_finished() && !vb.is_finished());
    }
}

#[test]
fn mitm_who_knows_the_secret_passes_control() {
    // Control experiment: the harness itself is able to report success, so the
    // failures above come from the missing secret.
    let mut rng = TestRng::new(b"mitm-control");
    let secret = VerifySecret::from("7391");
    for backend in [Backend::CPace, Backend::Smp] {
        let (a, b, va, vb) = mitm(backend, Some(&secret), Some(&secret), &mut rng);
        assert_eq!((a, b), (End::Equal, End::Equal), "{backend:?}");
        assert!(va.is_bound() && vb.is_bound());
    }
}

#[test]
fn plain_relay_of_the_test_fails() {
    // Mallory relays the verification messages unchanged between Alice and Bob
    // (each leg has its own binding): the test catches even a passive relay
    // without any secret.
    let mut rng = TestRng::new(b"relay");
    for backend in [Backend::CPace, Backend::Smp] {
        let pair = common::run_pair(backend, (&binding(1), None), (&binding(2), None), &mut rng);
        assert_eq!(pair.i_end, End::Failed(Error::NotEqual), "{backend:?}");
        if backend == Backend::Smp {
            assert_eq!(pair.r_end, End::Failed(Error::NotEqual));
        }
    }
}

#[test]
fn without_any_secret_the_mitm_succeeds_and_the_result_is_unbound() {
    let mut rng = TestRng::new(b"mitm-unbound");
    for backend in [Backend::CPace, Backend::Smp] {
        let (a, b, va, vb) = mitm(backend, None, None, &mut rng);
        assert_eq!((a, b), (End::Equal, End::Equal), "{backend:?}");
        assert!(!va.is_bound() && !vb.is_bound());
        let pair = common::run_pair(backend, (&binding(3), None), (&binding(3), None), &mut rng);
        assert_eq!((pair.i_end, pair.r_end), (End::Equal, End::Equal));
        assert!(!pair.initiator.is_bound() && !pair.responder.is_bound());
    }
}
