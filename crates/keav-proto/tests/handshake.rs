//! End-to-end tests of the KEAV handshake between in-memory devices with simulated time.

mod util;

use keav_proto::cache::{Mode, Verification};
use keav_proto::handshake::KeyAgreement;
use keav_proto::Error;
use util::{both_ok, run_session, Device, LinkModel};

const T0: u64 = 1_800_000_000;

/// A refusal that counts toward the peer's lockout.
fn refused(side: &util::Side) -> bool {
    matches!(side, Err(e) if e.counts_toward_lockout())
}

/// (DH?, verification ran?) that the mode table of PROTOCOL.md §4 prescribes for session k.
fn expected(mode: Mode, k: u64) -> (bool, bool) {
    match mode {
        Mode::NoContinuity | Mode::Paranoid => (true, true),
        Mode::Normal { verify_every } => {
            let verify = (k - 1) % u64::from(verify_every) == 0;
            (verify, verify)
        }
    }
}

fn mode_table(mode: Mode, secret: bool) {
    let mut a = Device::new("alice", mode, 1);
    let mut b = Device::new("bob", mode, 2);
    if secret {
        a = a.with_secret(b"pairing code 4711");
        b = b.with_secret(b"pairing code 4711");
    }
    for k in 1..=20u64 {
        // Alternate who initiates, so both roles use the same cache entry.
        let r = if k % 2 == 1 {
            run_session(&mut a, &mut b, LinkModel::LOSSY, k * 7919, T0 + k, None)
        } else {
            run_session(&mut b, &mut a, LinkModel::LOSSY, k * 7919, T0 + k, None)
        };
        let (oa, ob) = both_ok(&r);
        let (dh, verify) = expected(mode, k);
        assert_eq!(
            oa.key_agreement == KeyAgreement::Dh,
            dh,
            "{mode:?} session {k}: DH"
        );
        assert_eq!(
            oa.verification.ran(),
            verify,
            "{mode:?} session {k}: verification"
        );
        let want = match (verify, secret) {
            (false, _) => Verification::Skipped,
            (true, true) => Verification::Bound,
            (true, false) => Verification::Unbound,
        };
        assert_eq!(oa.verification, want, "{mode:?} session {k}");
        assert_eq!(ob.verification, want, "{mode:?} session {k}");
        if mode != Mode::NoContinuity {
            assert_eq!(oa.session_number, k);
            assert_eq!(oa.cache_matched, k > 1, "{mode:?} session {k}: continuity");
            assert!(!oa.cache_mismatch && !ob.cache_mismatch);
        }
        if mode == Mode::Paranoid {
            // Fresh identifiers every session.
            assert_ne!(oa.local_zid, a.zid);
        }
    }
}

#[test]
fn normal_mode_follows_the_table_over_a_lossy_link() {
    mode_table(Mode::NORMAL, true);
}

#[test]
fn normal_mode_without_secret_is_unbound() {
    mode_table(Mode::Normal { verify_every: 4 }, false);
}

#[test]
fn paranoid_mode_follows_the_table_over_a_lossy_link() {
    mode_table(Mode::Paranoid, true);
}

#[test]
fn no_continuity_mode_follows_the_table_over_a_lossy_link() {
    mode_table(Mode::NoContinuity, true);
}

#[test]
fn paranoid_zids_are_fresh_every_session() {
    let mut a = Device::new("alice", Mode::Paranoid, 1);
    let mut b = Device::new("bob", Mode::Paranoid, 2);
    let mut seen = std::collections::HashSet::new();
    for k in 1..=5 {
        let r = run_session(&mut a, &mut b, LinkModel::PERFECT, k, T0, None);
        let (oa, ob) = both_ok(&r);
        assert!(seen.insert(oa.local_zid));
        assert!(seen.insert(ob.local_zid));
    }
}

/// Mallory as two honest endpoints: one posing as Bob to Alice, one as Alice to Bob (with
/// the victims' ZIDs copied, which are public).
fn mallory(
    mode: Mode,
    victim_a: &Device,
    victim_b: &Device,
    secret: Option<&[u8]>,
) -> (Device, Device) {
    let mut as_bob = Device::new("bob", mode, 66);
    as_bob.zid = victim_b.zid;
    let mut as_alice = Device::new("alice", mode, 67);
    as_alice.zid = victim_a.zid;
    if let Some(s) = secret {
        as_bob = as_bob.with_secret(s);
        as_alice = as_alice.with_secret(s);
    }
    (as_bob, as_alice)
}

#[test]
fn mitm_in_every_session_is_refused_with_a_secret() {
    for mode in [Mode::NORMAL, Mode::Paranoid, Mode::NoContinuity] {
        let mut a = Device::new("alice", mode, 1).with_secret(b"real code");
        let mut b = Device::new("bob", mode, 2).with_secret(b"real code");
        let (mut m_bob, mut m_alice) = mallory(mode, &a, &b, Some(b"guess 1"));
        for k in 1..=3 {
            let left = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, k, T0, None);
            let right = run_session(&mut m_alice, &mut b, LinkModel::PERFECT, k + 100, T0, None);
            // The initiator checks the responder's confirmation tag first and sees the
            // mismatch itself; the responder sees the test aborted. Both count it.
            assert!(
                matches!(
                    left.a,
                    Err(Error::Verification(keav_verify::Error::NotEqual))
                ),
                "{mode:?}: alice must refuse, got {:?}",
                left.a.as_ref().map(|o| o.verification)
            );
            assert!(
                refused(&right.b),
                "{mode:?}: bob must refuse, got {:?}",
                right.b.as_ref().map(|o| o.verification)
            );
            assert!(
                left.b.is_err() && right.a.is_err(),
                "mallory's endpoints fail too"
            );
            // Nothing was cached with Mallory.
            assert!(a.entry("bob").is_none_or(|e| e.cache.rs1.is_none()));
        }
    }
}

#[test]
fn mitm_without_any_secret_succeeds_unbound_on_first_session() {
    let mut a = Device::new("alice", Mode::NORMAL, 1);
    let mut b = Device::new("bob", Mode::NORMAL, 2);
    let (mut m_bob, mut m_alice) = mallory(Mode::NORMAL, &a, &b, None);
    let left = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, 1, T0, None);
    let right = run_session(&mut m_alice, &mut b, LinkModel::PERFECT, 2, T0, None);
    let (oa, _) = both_ok(&left);
    let (_, ob) = both_ok(&right);
    assert_eq!(oa.verification, Verification::Unbound);
    assert_eq!(ob.verification, Verification::Unbound);
}

fn late_mitm(secret: Option<&[u8]>) {
    let mode = Mode::NORMAL;
    let mut a = Device::new("alice", mode, 1);
    let mut b = Device::new("bob", mode, 2);
    if let Some(s) = secret {
        a = a.with_secret(s);
        b = b.with_secret(s);
    }
    for k in 1..=4 {
        let r = run_session(&mut a, &mut b, LinkModel::PERFECT, k, T0, None);
        both_ok(&r);
    }
    let (mut m_bob, mut m_alice) = mallory(mode, &a, &b, secret.map(|_| &b"wrong guess"[..]));
    let before_a = a.entry("bob").unwrap().cache.clone();
    let left = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, 5, T0, None);
    let right = run_session(&mut m_alice, &mut b, LinkModel::PERFECT, 6, T0, None);
    for (who, r) in [("alice", &left.a), ("bob", &right.b)] {
        match (secret, r) {
            (None, Err(Error::CacheMismatch)) => {}
            (Some(_), Err(Error::Verification(_) | Error::VerificationAborted(_))) => {}
            (_, other) => panic!(
                "{who}: expected refusal, got {:?}",
                other.as_ref().map(|o| o.verification)
            ),
        }
    }
    // The victims' caches are unchanged (held back) and now demand verification.
    let after_a = a.entry("bob").unwrap();
    assert_eq!(after_a.cache.rs1, before_a.rs1);
    assert!(after_a.cache.verify_due);
    // Mallory gone: Alice and Bob resume (DH + verification because of the flag).
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 7, T0, None);
    let (oa, _) = both_ok(&r);
    assert!(oa.cache_matched);
    assert!(oa.verification.ran());
}

#[test]
fn mitm_from_session_5_is_detected_by_key_continuity() {
    late_mitm(None);
}

#[test]
fn mitm_from_session_5_also_fails_the_equality_test_with_a_secret() {
    late_mitm(Some(b"0451-2207"));
}

#[test]
fn smp_backend_completes_and_catches_mitm() {
    let mut a = Device::new("alice", Mode::Paranoid, 1).with_secret(b"s3cret");
    let mut b = Device::new("bob", Mode::Paranoid, 2).with_secret(b"s3cret");
    // Alice prefers SMP; Bob offers both: the initiator's preference wins.
    a.backends = vec![keav_verify::Backend::Smp, keav_verify::Backend::CPace];
    let r = run_session(&mut a, &mut b, LinkModel::LOSSY, 9, T0, None);
    let (oa, ob) = both_ok(&r);
    assert_eq!(oa.backend, Some(keav_verify::Backend::Smp));
    assert_eq!(ob.backend, Some(keav_verify::Backend::Smp));
    assert_eq!(oa.verification, Verification::Bound);
    let (mut m_bob, _) = mallory(Mode::Paranoid, &a, &b, Some(b"nope"));
    m_bob.backends = vec![keav_verify::Backend::Smp];
    let r = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, 10, T0, None);
    assert!(
        matches!(r.a, Err(Error::Verification(keav_verify::Error::NotEqual))),
        "{:?}",
        r.a.as_ref().err()
    );
    assert!(refused(&r.b));
}

#[test]
fn lockout_after_k_failures_with_backoff() {
    let mut a = Device::new("alice", Mode::NORMAL, 1).with_secret(b"right");
    let b = Device::new("bob", Mode::NORMAL, 2).with_secret(b"right");
    a.lockout.max_failures = 3;
    a.lockout.base_backoff_secs = 100;
    let (mut m_bob, _) = mallory(Mode::NORMAL, &a, &b, Some(b"wrong"));
    for k in 0..3 {
        let r = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, k, T0 + k, None);
        assert!(matches!(r.a, Err(Error::Verification(_))));
    }
    let e = a.entry("bob").unwrap();
    assert_eq!(e.failures, 3);
    assert_eq!(e.cache.locked_until, Some(T0 + 2 + 100));
    // Locked: refused before any message is sent.
    let r = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, 50, T0 + 50, None);
    assert!(matches!(r.a, Err(Error::LockedOut { until }) if until == T0 + 102));
    assert!(r.a_to_b.is_empty(), "no Hello while locked out");
    // After the backoff, one more attempt; failing again doubles the lockout.
    let r = run_session(&mut a, &mut m_bob, LinkModel::PERFECT, 51, T0 + 200, None);
    assert!(matches!(r.a, Err(Error::Verification(_))));
    assert_eq!(
        a.entry("bob").unwrap().cache.locked_until,
        Some(T0 + 200 + 200)
    );
}

#[test]
fn cache_deleted_on_one_side_is_repaired_by_a_bound_test() {
    let mut a = Device::new("alice", Mode::NORMAL, 1).with_secret(b"code");
    let mut b = Device::new("bob", Mode::NORMAL, 2).with_secret(b"code");
    for k in 1..=3 {
        both_ok(&run_session(
            &mut a,
            &mut b,
            LinkModel::PERFECT,
            k,
            T0,
            None,
        ));
    }
    b.peers.clear();
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 4, T0, None);
    let (oa, ob) = both_ok(&r);
    assert!(oa.cache_mismatch, "alice expected a match");
    assert!(
        !ob.cache_mismatch,
        "bob has no entry: a first session for him"
    );
    assert_eq!(oa.verification, Verification::Bound);
    assert_eq!(oa.key_agreement, KeyAgreement::Dh);
    assert!(oa.cache_update.is_some());
    // Back in sync: next session is preshared.
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 5, T0, None);
    let (oa, _) = both_ok(&r);
    assert_eq!(oa.key_agreement, KeyAgreement::Preshared);
}

#[test]
fn cache_deleted_on_one_side_without_secret_is_refused_by_the_survivor() {
    let mut a = Device::new("alice", Mode::NORMAL, 1);
    let mut b = Device::new("bob", Mode::NORMAL, 2);
    for k in 1..=3 {
        both_ok(&run_session(
            &mut a,
            &mut b,
            LinkModel::PERFECT,
            k,
            T0,
            None,
        ));
    }
    b.peers.clear();
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 4, T0, None);
    assert!(
        matches!(r.a, Err(Error::CacheMismatch)),
        "{:?}",
        r.a.as_ref().err()
    );
    // With explicit repair allowed (TOFU re-pairing) it goes through.
    a.allow_repair = true;
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 5, T0, None);
    let (oa, _) = both_ok(&r);
    assert_eq!(oa.verification, Verification::Unbound);
}

#[test]
fn one_sided_cache_update_recovers_through_one_dh_fallback() {
    let mut a = Device::new("alice", Mode::NORMAL, 1);
    let mut b = Device::new("bob", Mode::NORMAL, 2);
    both_ok(&run_session(
        &mut a,
        &mut b,
        LinkModel::PERFECT,
        1,
        T0,
        None,
    ));
    both_ok(&run_session(
        &mut a,
        &mut b,
        LinkModel::PERFECT,
        2,
        T0,
        None,
    ));
    // Bob crashed before persisting session 3: he keeps the state after session 2.
    let bob_before = b.peers.clone();
    both_ok(&run_session(
        &mut a,
        &mut b,
        LinkModel::PERFECT,
        3,
        T0,
        None,
    ));
    b.peers = bob_before;
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 4, T0, None);
    let (oa, ob) = both_ok(&r);
    assert_eq!(
        oa.key_agreement,
        KeyAgreement::Dh,
        "preshared fails, DH fallback"
    );
    assert!(oa.cache_matched && ob.cache_matched, "rs2 still matches");
    assert!(!oa.cache_mismatch && !ob.cache_mismatch);
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 5, T0, None);
    assert_eq!(both_ok(&r).0.key_agreement, KeyAgreement::Preshared);
}

#[test]
fn simultaneous_commits_are_resolved_by_commit_contention() {
    use keav_proto::cache::Zid;
    use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup, Role};
    use rand::SeedableRng;
    let mut roles_won = [0u32; 2];
    for seed in 0..16 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let cfg = |zid: u8| {
            let mut c = Config::new(Zid([zid; 12]), Mode::NORMAL);
            c.verify_secret = Some(keav_verify::VerifySecret::new(b"code".to_vec()));
            c
        };
        // Both devices call each other at the same moment: both send Commit.
        let mut eps = [
            Endpoint::initiator(cfg(1), PeerLookup::Given(None), 0, T0, &mut rng).expect("a"),
            Endpoint::initiator(cfg(2), PeerLookup::Given(None), 0, T0, &mut rng).expect("b"),
        ];
        let mut done: [Option<Box<keav_proto::handshake::SessionOutcome>>; 2] = [None, None];
        let mut commits = 0;
        for _ in 0..50 {
            // Collect both flights first, then deliver: the Commits cross on the wire.
            let flights: Vec<Vec<Vec<u8>>> = eps
                .iter_mut()
                .map(|e| std::iter::from_fn(|| e.poll_transmit()).collect())
                .collect();
            for (from, flight) in flights.into_iter().enumerate() {
                for m in flight {
                    if keav_proto::msg::peek_type(&m) == Ok(keav_proto::msg::MessageType::Commit) {
                        commits += 1;
                    }
                    eps[1 - from]
                        .handle_message(&m, 0, &mut rng)
                        .expect("no failure");
                }
            }
            for (i, e) in eps.iter_mut().enumerate() {
                while let Some(ev) = e.poll_event() {
                    if let Event::Established(o) = ev {
                        done[i] = Some(o);
                    }
                }
            }
            if done.iter().all(Option::is_some) {
                break;
            }
        }
        assert_eq!(commits, 2, "both sides committed");
        let [Some(a), Some(b)] = &done else {
            panic!("seed {seed}: not completed")
        };
        assert_ne!(a.role, b.role, "one side became responder");
        assert_eq!(a.exported_key, b.exported_key);
        assert_eq!(a.verification, Verification::Bound);
        roles_won[usize::from(a.role == Role::Initiator)] += 1;
    }
    assert!(
        roles_won[0] > 0 && roles_won[1] > 0,
        "hvi decides, not the order: {roles_won:?}"
    );
}

#[test]
fn channel_aead_is_the_initiators_first_common_choice() {
    use keav_proto::record::Aead;
    let mut a = Device::new("alice", Mode::NORMAL, 1);
    let mut b = Device::new("bob", Mode::NORMAL, 2);
    let r = run_session(&mut a, &mut b, LinkModel::PERFECT, 1, T0, None);
    let (oa, ob) = both_ok(&r);
    assert_eq!(oa.channel_aead, Some(Aead::local_preference()[0]));
    assert_eq!(oa.channel_aead, ob.channel_aead);
}

#[test]
fn retransmission_can_be_turned_off_for_reliable_transports() {
    use keav_proto::cache::Zid;
    use keav_proto::handshake::{Config, Endpoint, PeerLookup};
    use rand::SeedableRng;
    for retransmit in [true, false] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = Config::new(Zid([1; 12]), Mode::NORMAL);
        c.retransmit = retransmit;
        let deadline = c.handshake_timeout_ms;
        let mut ep = Endpoint::initiator(c, PeerLookup::Given(None), 0, T0, &mut rng).unwrap();
        assert!(ep.poll_transmit().is_some(), "Hello");
        let mut resent = 0;
        let mut now = 0;
        // Nobody answers: walk the timers up to just before the deadline.
        while let Some(t) = ep.poll_timeout() {
            if t >= deadline {
                break;
            }
            now = t;
            ep.handle_timeout(now).unwrap();
            resent += std::iter::from_fn(|| ep.poll_transmit()).count();
        }
        if retransmit {
            assert!(
                resent >= 10,
                "T1 resends Hello ({resent}, last at {now} ms)"
            );
        } else {
            assert_eq!(resent, 0, "no resend on a reliable transport");
            assert_eq!(
                ep.poll_timeout(),
                Some(deadline),
                "only the deadline remains"
            );
        }
        assert!(
            ep.handle_timeout(deadline).is_err(),
            "the deadline still ends it"
        );
    }
}
