//! Glue between the sans-IO handshake and the store: the lookups the handshake asks for and
//! what to persist when a session ends. Every transport driver uses it the same way:
//!
//! 1. [`Ledger::initiator`] (by the local label of the peer being called) or
//!    [`Ledger::responder`];
//! 2. on [`Event::NeedPeerCache`], [`Ledger::lookup`];
//! 3. on [`Event::VerificationStarting`], [`Ledger::verification_starting`] — *before* sending
//!    what the endpoint queued — and [`Endpoint::abort`] if it refuses: every attempt at the
//!    equality test is counted in advance, so neither parallel sessions nor a peer that
//!    vanishes after learning the answer gets an uncounted guess;
//! 4. on [`Event::Established`], [`Ledger::succeeded`] — *before* sending the responder's
//!    Conf2ACK (PROTOCOL.md: the responder persists first); this takes the advance count back;
//! 5. on an error, [`Ledger::failed`], which counts failures that gave the peer a guess of the
//!    verification secret (unless already counted) and returns the resulting lockout.
//!
//! Unknown peers share one attempt budget (the anonymous bucket): the verification secret
//! is the device's, so changing identities must not buy an attacker more guesses.
//!
//! [`pair_in_process`] runs both sides of one session in memory, for the demo and for tests.

use keav_proto::cache::{LockoutPolicy, Mode, PeerCache, Zid};
use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup, SessionOutcome};
use rand_core::{CryptoRng, RngCore};

use crate::{Error, LockState, PeerId, Store, ANONYMOUS_PEER};

/// One session's bookkeeping against a [`Store`].
#[derive(Debug)]
pub struct Ledger<'a> {
    store: &'a Store,
    mode: Mode,
    policy: LockoutPolicy,
    label: Option<String>,
    peer: Option<PeerId>,
    /// Where this session's attempt was counted in advance, if it was.
    counted_on: Option<PeerId>,
}

impl<'a> Ledger<'a> {
    /// For the side that calls the peer it knows as `label`. Returns the lookup to give
    /// [`Endpoint::initiator`]; a locked-out peer makes the endpoint refuse before any message.
    pub fn initiator(
        store: &'a Store,
        mode: Mode,
        policy: LockoutPolicy,
        label: &str,
    ) -> Result<(Self, PeerLookup), Error> {
        let rec = store.peer_by_label(label)?;
        let lookup = match &rec {
            Some(r) => PeerLookup::Given(Some(r.cache.clone())),
            // Not known by this label: maybe known by ZID (it called us before); look it up
            // when its Hello arrives. Paranoid peers have no stable ZID to find.
            None if mode != Mode::Paranoid => PeerLookup::AtHello,
            None => PeerLookup::Given(None),
        };
        Ok((
            Self {
                store,
                mode,
                policy,
                label: Some(label.to_string()),
                peer: rec.map(|r| r.id),
                counted_on: None,
            },
            lookup,
        ))
    }

    /// For the side that waits for callers.
    pub fn responder(store: &'a Store, mode: Mode, policy: LockoutPolicy) -> Self {
        Self {
            store,
            mode,
            policy,
            label: None,
            peer: None,
            counted_on: None,
        }
    }

    /// Answers [`Event::NeedPeerCache`]: by retained-secret ID in paranoid mode, else by ZID.
    pub fn lookup(
        &mut self,
        zid: &Zid,
        rs_id_hint: Option<[u8; 8]>,
        now: u64,
    ) -> Result<Option<PeerCache>, Error> {
        let rec = match rs_id_hint {
            Some(id) => self.store.peer_by_initiator_rs_id(&id)?,
            None => self.store.peer_by_zid(zid)?,
        };
        self.peer = rec.as_ref().map(|r| r.id);
        match rec {
            Some(r) => Ok(Some(r.cache)),
            None => {
                // Unknown peer: no secrets, but the shared budget of unknown peers applies.
                let lock = self.store.lock_state(&ANONYMOUS_PEER, now, &self.policy)?;
                Ok(Some(PeerCache {
                    locked_until: lock.locked_until,
                    ..PeerCache::default()
                }))
            }
        }
    }

    /// Counts one attempt at the equality test before it can reveal anything, and refuses it
    /// (`Err(LockedOut)`, to pass to [`Endpoint::abort`]) if the peer's budget — or for an
    /// unknown peer the shared one — is used up.
    pub fn verification_starting(
        &mut self,
        now: u64,
    ) -> Result<Result<(), keav_proto::Error>, Error> {
        if self.counted_on.is_some() {
            return Ok(Ok(()));
        }
        let id = match (self.peer, &self.label) {
            (Some(id), _) => id,
            (None, Some(label)) => {
                let id = self.store.create_peer(None, Some(label), self.mode, now)?;
                self.peer = Some(id);
                id
            }
            (None, None) => ANONYMOUS_PEER,
        };
        let before = self.store.lock_state(&id, now, &self.policy)?;
        if let Some(until) = before.locked_until {
            return Ok(Err(keav_proto::Error::LockedOut { until }));
        }
        self.store
            .record_verification_failure(&id, now, &self.policy)?;
        self.counted_on = Some(id);
        Ok(Ok(()))
    }

    /// The peer record this session is about, once known.
    pub fn peer(&self) -> Option<PeerId> {
        self.peer
    }

    /// Persists a completed session (one atomic transaction for the secrets and counters).
    pub fn succeeded(&mut self, o: &SessionOutcome, now: u64) -> Result<PeerId, Error> {
        let zid = (self.mode != Mode::Paranoid).then_some(o.peer_zid);
        let id = match self.peer {
            Some(id) => {
                if zid.is_some() && self.store.peer(&id)?.is_some_and(|r| r.zid != zid) {
                    self.store.set_zid(&id, zid)?;
                }
                id
            }
            None => {
                // A new peer. In normal mode a record may already exist under this ZID
                // (e.g. we called it by label before, or it called us): reuse it.
                let existing = match zid {
                    Some(z) => self.store.peer_by_zid(&z)?.map(|r| r.id),
                    None => None,
                };
                match existing {
                    Some(id) => id,
                    None => self
                        .store
                        .create_peer(zid, self.label.as_deref(), self.mode, now)?,
                }
            }
        };
        self.peer = Some(id);
        if let Some(label) = &self.label {
            // Called by a label this record did not have yet (it called us before): remember
            // it, unless the label is someone else's.
            if self.store.peer(&id)?.is_some_and(|r| r.label.is_none())
                && self.store.peer_by_label(label)?.is_none()
            {
                self.store.set_label(&id, Some(label))?;
            }
        }
        if let Some(u) = &o.cache_update {
            // Resets the failure counter (and so the advance count) when the test ran.
            self.store.commit_session(&id, u, now)?;
        }
        if let Some(counted) = self.counted_on.take() {
            if counted == ANONYMOUS_PEER || o.cache_update.is_none() {
                self.store
                    .retract_verification_failure(&counted, &self.policy)?;
            }
        }
        Ok(id)
    }

    /// Records a failed session. Failures that gave the peer a guess (a failed, aborted or
    /// refused equality test, a refused cache mismatch) count toward lockout: against the
    /// peer's record if it is known (or the label we called), else an anonymous bucket.
    pub fn failed(
        &mut self,
        err: &keav_proto::Error,
        now: u64,
    ) -> Result<Option<LockState>, Error> {
        if let Some(id) = self.counted_on {
            // Already counted when the test started.
            return self.store.lock_state(&id, now, &self.policy).map(Some);
        }
        if !err.counts_toward_lockout() {
            return Ok(None);
        }
        let id = match (self.peer, &self.label) {
            (Some(id), _) => id,
            (None, Some(label)) => {
                let id = self.store.create_peer(None, Some(label), self.mode, now)?;
                self.peer = Some(id);
                id
            }
            (None, None) => ANONYMOUS_PEER,
        };
        self.store
            .record_verification_failure(&id, now, &self.policy)
            .map(Some)
    }
}

/// Both sides of one in-process session.
#[derive(Debug)]
pub struct PairResult {
    /// The initiator's result.
    pub initiator: Result<Box<SessionOutcome>, keav_proto::Error>,
    /// The responder's result.
    pub responder: Result<Box<SessionOutcome>, keav_proto::Error>,
}

/// One device of an in-process pair.
#[derive(Debug)]
pub struct LocalDevice<'a> {
    /// Its store.
    pub store: &'a Store,
    /// Its handshake configuration (ZID should be the store's identity).
    pub config: Config,
}

/// Drains one endpoint's events through its ledger. Returns the outcome if it completed, or
/// the error if the ledger made it stop.
fn drain_events<R: RngCore + CryptoRng>(
    ep: &mut Endpoint,
    ledger: &mut Ledger<'_>,
    unix_now: u64,
    rng: &mut R,
) -> Result<Option<Result<Box<SessionOutcome>, keav_proto::Error>>, Error> {
    let mut result = None;
    while let Some(ev) = ep.poll_event() {
        match ev {
            Event::NeedPeerCache { zid, rs_id_hint } => {
                let cache = ledger.lookup(&zid, rs_id_hint, unix_now)?;
                if let Err(e) = ep.provide_peer_cache(cache, 0, rng) {
                    ledger.failed(&e, unix_now)?;
                    result = Some(Err(e));
                }
            }
            Event::VerificationStarting { .. } => {
                if let Err(refusal) = ledger.verification_starting(unix_now)? {
                    let e = ep.abort(refusal);
                    result = Some(Err(e));
                }
            }
            Event::Established(o) => {
                ledger.succeeded(&o, unix_now)?;
                result = Some(Ok(o));
            }
            _ => {}
        }
    }
    Ok(result)
}

type Side<'a> = (
    Endpoint,
    Ledger<'a>,
    Option<Result<Box<SessionOutcome>, keav_proto::Error>>,
);

/// One step of `from`: its events go through its ledger first (which may have to record or
/// refuse before anything is sent), then its messages go to `to`. Returns whether anything
/// happened.
fn relay<R: RngCore + CryptoRng>(
    from: &mut Side<'_>,
    to: &mut Side<'_>,
    unix_now: u64,
    rng: &mut R,
) -> Result<bool, Error> {
    let mut moved = false;
    if let Some(r) = drain_events(&mut from.0, &mut from.1, unix_now, rng)? {
        from.2.get_or_insert(r);
        moved = true;
    }
    while let Some(m) = from.0.poll_transmit() {
        moved = true;
        if to.2.is_none() {
            if let Err(e) = to.0.handle_message(&m, 0, rng) {
                to.1.failed(&e, unix_now)?;
                to.2 = Some(Err(e));
            }
        }
    }
    Ok(moved)
}

/// Runs one session between two devices in this process, with no loss, persisting both
/// outcomes and counting failures like a real driver. `label` is how the initiator knows the
/// responder. Store errors abort the run.
pub fn pair_in_process<R: RngCore + CryptoRng>(
    initiator: LocalDevice<'_>,
    label: &str,
    responder: LocalDevice<'_>,
    unix_now: u64,
    rng: &mut R,
) -> Result<PairResult, Error> {
    let (mode_a, pol_a) = (initiator.config.mode, initiator.config.lockout);
    let (mode_b, pol_b) = (responder.config.mode, responder.config.lockout);
    let (la, lookup) = Ledger::initiator(initiator.store, mode_a, pol_a, label)?;
    let lb = Ledger::responder(responder.store, mode_b, pol_b);
    let a = match Endpoint::initiator(initiator.config, lookup, 0, unix_now, rng) {
        Ok(a) => a,
        Err(e) => {
            let mut la = la;
            la.failed(&e, unix_now)?;
            return Ok(PairResult {
                initiator: Err(e),
                responder: Err(keav_proto::Error::Timeout),
            });
        }
    };
    let b = Endpoint::responder(responder.config, 0, unix_now, rng);
    let mut sa: Side<'_> = (a, la, None);
    let mut sb: Side<'_> = (b, lb, None);
    for _ in 0..256 {
        let moved =
            relay(&mut sa, &mut sb, unix_now, rng)? | relay(&mut sb, &mut sa, unix_now, rng)?;
        if !moved || (sa.2.is_some() && sb.2.is_some()) {
            break;
        }
    }
    let (ra, rb) = (sa.2, sb.2);
    let incomplete = || Err(keav_proto::Error::Timeout);
    Ok(PairResult {
        initiator: ra.unwrap_or_else(incomplete),
        responder: rb.unwrap_or_else(incomplete),
    })
}
