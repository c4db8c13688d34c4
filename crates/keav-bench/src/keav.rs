//! In-memory keav sessions: two endpoints pumped against each other.

use keav_proto::cache::{Mode, PeerCache, Zid};
use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup, SessionOutcome};
use keav_verify::{Backend, VerifySecret};
use rand_core::{CryptoRng, RngCore};

use crate::BenchError;

/// Fixed wall-clock second passed to the endpoints (no cache expires, nobody is locked out).
pub const BENCH_UNIX_NOW: u64 = 1_700_000_000;

/// Pairing code both benchmark devices share (so verification is *bound*).
pub const BENCH_PAIRING_CODE: &[u8] = b"bench pairing code 4711-0815";

/// Upper bound on pump rounds; a complete handshake needs well under ten.
const MAX_ROUNDS: usize = 64;

/// One device of a benchmarked session.
#[derive(Clone, Debug)]
pub struct DeviceSetup {
    /// The device's ZID.
    pub zid: Zid,
    /// Key-continuity mode.
    pub mode: Mode,
    /// Equality tests offered, in order of preference.
    pub backends: Vec<Backend>,
    /// Pairing code (verification secret); `None` = unbound verification.
    pub secret: Option<Vec<u8>>,
    /// What the device remembers about its peer; `None` = first contact.
    pub cache: Option<PeerCache>,
}

impl DeviceSetup {
    /// A device in `normal` mode (verify every 10 sessions) offering `backend`, holding
    /// [`BENCH_PAIRING_CODE`], with no cache yet.
    pub fn new(zid: [u8; 12], backend: Backend) -> Self {
        Self {
            zid: Zid(zid),
            mode: Mode::Normal { verify_every: 10 },
            backends: vec![backend],
            secret: Some(BENCH_PAIRING_CODE.to_vec()),
            cache: None,
        }
    }

    /// The handshake configuration of this device.
    pub fn config(&self) -> Config {
        let mut cfg = Config::new(self.zid, self.mode);
        cfg.backends = self.backends.clone();
        cfg.verify_secret = self.secret.clone().map(VerifySecret::new);
        cfg
    }

    /// Records a completed session in this device's cache, as a store would.
    pub fn remember(&mut self, o: &SessionOutcome) {
        let c = self.cache.get_or_insert_with(PeerCache::default);
        match &o.cache_update {
            Some(u) => {
                c.rs1 = Some(u.rs1.clone());
                c.rs2 = u.rs2.clone();
                c.expires_at = u.expires_at;
                c.sessions = u.sessions;
                c.verify_due = false;
            }
            None => c.sessions = o.session_number,
        }
    }
}

/// The two devices of a benchmarked session: `initiator` calls `responder`.
#[derive(Clone, Debug)]
pub struct KeavSetup {
    /// The device that sends Commit.
    pub initiator: DeviceSetup,
    /// The device that answers.
    pub responder: DeviceSetup,
}

impl KeavSetup {
    /// First contact in DH mode: no caches, so the equality test `backend` runs, bound by
    /// the shared pairing code.
    pub fn first_session(backend: Backend) -> Self {
        Self {
            initiator: DeviceSetup::new(*b"bench-alice1", backend),
            responder: DeviceSetup::new(*b"bench-bob--2", backend),
        }
    }

    /// Two devices that completed one verified session (CPace) and hold each other's
    /// retained secret: the next session (number 2 of `verify_every` 10) is preshared mode
    /// with no verification.
    pub fn preshared<R: RngCore + CryptoRng>(rng: &mut R) -> Result<Self, BenchError> {
        let mut setup = Self::first_session(Backend::CPace);
        let first = run_keav_handshake(&setup, rng)?;
        setup.initiator.remember(&first.initiator);
        setup.responder.remember(&first.responder);
        Ok(setup)
    }
}

/// Both sides' results of one completed session.
#[derive(Debug)]
pub struct KeavOutcome {
    /// The initiator's outcome.
    pub initiator: Box<SessionOutcome>,
    /// The responder's outcome.
    pub responder: Box<SessionOutcome>,
}

/// Runs one complete keav session between the two devices of `setup`, in memory, and checks
/// that both sides released the same exported key and SAS.
///
/// The caches in `setup` are cloned into the endpoints and left unchanged, so the same setup
/// can be run again from the same state (use [`DeviceSetup::remember`] to advance it).
pub fn run_keav_handshake<R: RngCore + CryptoRng>(
    setup: &KeavSetup,
    rng: &mut R,
) -> Result<KeavOutcome, BenchError> {
    let now = 0;
    let unix = BENCH_UNIX_NOW;
    let lookup = PeerLookup::Given(setup.initiator.cache.clone());
    let mut a = Endpoint::initiator(setup.initiator.config(), lookup, now, unix, rng)?;
    let mut b = Endpoint::responder(setup.responder.config(), now, unix, rng);
    let (mut out_a, mut out_b) = (None, None);
    for _ in 0..MAX_ROUNDS {
        let mut moved = false;
        while let Some(m) = a.poll_transmit() {
            moved = true;
            b.handle_message(&m, now, rng)?;
        }
        while let Some(ev) = b.poll_event() {
            moved = true;
            match ev {
                Event::NeedPeerCache { .. } => {
                    b.provide_peer_cache(setup.responder.cache.clone(), now, rng)?;
                }
                Event::Established(o) => out_b = Some(o),
                // No attempt ledger in a benchmark.
                _ => {}
            }
        }
        while let Some(m) = b.poll_transmit() {
            moved = true;
            a.handle_message(&m, now, rng)?;
        }
        while let Some(ev) = a.poll_event() {
            moved = true;
            match ev {
                Event::NeedPeerCache { .. } => {
                    a.provide_peer_cache(setup.initiator.cache.clone(), now, rng)?;
                }
                Event::Established(o) => out_a = Some(o),
                _ => {}
            }
        }
        if (out_a.is_some() && out_b.is_some()) || !moved {
            break;
        }
    }
    match (out_a, out_b) {
        (Some(initiator), Some(responder)) => {
            if initiator.exported_key != responder.exported_key || initiator.sas != responder.sas {
                return Err(BenchError::KeyMismatch("keav"));
            }
            Ok(KeavOutcome {
                initiator,
                responder,
            })
        }
        _ => Err(BenchError::Incomplete("keav")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keav_proto::cache::Verification;
    use keav_proto::handshake::KeyAgreement;
    use rand_core::OsRng;

    #[test]
    fn first_session_cpace_is_dh_and_bound() {
        let o = run_keav_handshake(&KeavSetup::first_session(Backend::CPace), &mut OsRng).unwrap();
        for s in [&o.initiator, &o.responder] {
            assert_eq!(s.key_agreement, KeyAgreement::Dh);
            assert_eq!(s.verification, Verification::Bound);
            assert_eq!(s.backend, Some(Backend::CPace));
            assert_eq!(s.session_number, 1);
            assert!(s.cache_update.is_some());
        }
        assert_eq!(o.initiator.exported_key, o.responder.exported_key);
        assert_ne!(o.initiator.exported_key.expose(), &[0u8; 32]);
    }

    #[test]
    fn first_session_smp_is_dh_and_bound() {
        let o = run_keav_handshake(&KeavSetup::first_session(Backend::Smp), &mut OsRng).unwrap();
        for s in [&o.initiator, &o.responder] {
            assert_eq!(s.key_agreement, KeyAgreement::Dh);
            assert_eq!(s.verification, Verification::Bound);
            assert_eq!(s.backend, Some(Backend::Smp));
        }
        assert_eq!(o.initiator.exported_key, o.responder.exported_key);
    }

    #[test]
    fn preshared_session_repeats_from_the_same_cache() {
        let setup = KeavSetup::preshared(&mut OsRng).unwrap();
        assert_eq!(setup.initiator.cache.as_ref().unwrap().sessions, 1);
        assert_eq!(setup.responder.cache.as_ref().unwrap().sessions, 1);
        let o1 = run_keav_handshake(&setup, &mut OsRng).unwrap();
        let o2 = run_keav_handshake(&setup, &mut OsRng).unwrap();
        for s in [&o1.initiator, &o1.responder, &o2.initiator, &o2.responder] {
            assert_eq!(s.key_agreement, KeyAgreement::Preshared);
            assert_eq!(s.verification, Verification::Skipped);
            assert!(s.cache_matched);
            assert_eq!(s.session_number, 2);
        }
        assert_eq!(o1.initiator.exported_key, o1.responder.exported_key);
        // Fresh nonces/hash chains: two runs from the same cache yield different keys.
        assert_ne!(o1.initiator.exported_key, o2.initiator.exported_key);
    }

    #[test]
    fn mismatched_pairing_codes_fail() {
        let mut setup = KeavSetup::first_session(Backend::CPace);
        setup.responder.secret = Some(b"another code".to_vec());
        let r = run_keav_handshake(&setup, &mut OsRng);
        assert!(matches!(r, Err(BenchError::Keav(_))), "{r:?}");
    }
}
