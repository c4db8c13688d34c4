//! Arbitrary bytes fed to `receive` in every state never panic, and an error
//! always leaves the verifier in a final state.

mod common;

use common::{binding, TestRng};
use keav_verify::{Backend, Error, Role, Verifier, VerifySecret};
use proptest::prelude::*;

/// Honest pair advanced by `steps` messages (clamped to the protocol length).
fn advanced(backend: Backend, steps: usize, seed: u64) -> (Verifier, Verifier, TestRng) {
    let mut rng = TestRng::new(&seed.to_le_bytes());
    let b = binding(1);
    let s = VerifySecret::from("pin");
    let (mut i, first) = Verifier::start(backend, Role::Initiator, &b, Some(&s), &mut rng).unwrap();
    let (mut r, _) = Verifier::start(backend, Role::Responder, &b, Some(&s), &mut rng).unwrap();
    let mut next = first;
    for k in 0..steps {
        let Some(msg) = next.take() else { break };
        next = if k % 2 == 0 {
            r.receive(&msg, &mut rng).unwrap()
        } else {
            i.receive(&msg, &mut rng).unwrap()
        };
    }
    (i, r, rng)
}

const SIZES: [usize; 7] = [32, 64, 96, 192, 256, 352, 0];

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..400),
        (0..SIZES.len(), any::<u64>()).prop_map(|(k, seed)| {
            let mut v = vec![0u8; SIZES[k]];
            rand_core::RngCore::fill_bytes(&mut TestRng::new(&seed.to_be_bytes()), &mut v);
            v
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn receive_never_panics(
        smp in any::<bool>(),
        steps in 0usize..5,
        to_initiator in any::<bool>(),
        pre_fail in any::<bool>(),
        seed in any::<u64>(),
        msgs in proptest::collection::vec(payload(), 1..4),
    ) {
        let backend = if smp { Backend::Smp } else { Backend::CPace };
        let (mut i, mut r, mut rng) = advanced(backend, steps, seed);
        let v = if to_initiator { &mut i } else { &mut r };
        let mut failed = false;
        if pre_fail {
            failed = v.receive(&[1, 2, 3], &mut rng).is_err();
            prop_assert!(failed, "a 3-byte message is never valid");
        }
        for msg in &msgs {
            let was_finished = v.is_finished();
            let res = v.receive(msg, &mut rng);
            if was_finished || failed {
                prop_assert_eq!(res, Err(Error::Unexpected));
                prop_assert_eq!(v.is_finished(), was_finished);
                continue;
            }
            if res.is_err() {
                failed = true;
                prop_assert!(!v.is_finished());
                prop_assert!(!v.ready_for_confirm());
                prop_assert!(v.key().is_none());
                prop_assert_eq!(v.receive(msg, &mut rng), Err(Error::Unexpected));
            }
        }
    }
}
