//! Glue between the sans-IO handshake and the store: the lookups the handshake asks for and
//! what to persist when a session ends. Every transport driver uses it the same way:
//!
//! 1. [`Ledger::initiator`] (by the local label of the peer being called) or
//!    [`Ledger::responder`];
//! 2. on [`Event::NeedPeerCache`], [`Ledger::lookup`];
//! 3. on [`Event::Established`], [`Ledger::succeeded`] — *before* sending the responder's
//!    Conf2ACK (PROTOCOL.md: the responder persists first);
//! 4. on an error, [`Ledger::failed`], which counts failures that gave the peer a guess of the
//!    verification secret and returns the resulting lockout.
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
        let lookup = PeerLookup::Given(rec.as_ref().map(|r| r.cache.clone()));
        Ok((
            Self {
                store,
                mode,
                policy,
                label: Some(label.to_string()),
                peer: rec.map(|r| r.id),
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
        }
    }

    /// Answers [`Event::NeedPeerCache`]: by retained-secret ID in paranoid mode, else by ZID.
    pub fn lookup(
        &mut self,
        zid: &Zid,
        rs_id_hint: Option<[u8; 8]>,
    ) -> Result<Option<PeerCache>, Error> {
        let rec = match rs_id_hint {
            Some(id) => self.store.peer_by_initiator_rs_id(&id)?,
            None if self.label.is_some() => self
                .store
                .peer_by_label(self.label.as_deref().unwrap_or(""))?,
            None => self.store.peer_by_zid(zid)?,
        };
        self.peer = rec.as_ref().map(|r| r.id);
        Ok(rec.map(|r| r.cache))
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
        if let Some(u) = &o.cache_update {
            self.store.commit_session(&id, u, now)?;
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
    let (mut la, lookup) = Ledger::initiator(initiator.store, mode_a, pol_a, label)?;
    let mut lb = Ledger::responder(responder.store, mode_b, pol_b);
    let mut b = Endpoint::responder(responder.config, 0, unix_now, rng);
    let mut res_a = None;
    let mut res_b = None;
    let mut a = match Endpoint::initiator(initiator.config, lookup, 0, unix_now, rng) {
        Ok(a) => Some(a),
        Err(e) => {
            la.failed(&e, unix_now)?;
            res_a = Some(Err(e));
            None
        }
    };
    for _ in 0..256 {
        let mut moved = false;
        if let Some(a) = a.as_mut() {
            while let Some(m) = a.poll_transmit() {
                moved = true;
                if res_b.is_none() {
                    if let Err(e) = b.handle_message(&m, 0, rng) {
                        lb.failed(&e, unix_now)?;
                        res_b = Some(Err(e));
                    }
                }
            }
        }
        while let Some(ev) = b.poll_event() {
            moved = true;
            match ev {
                Event::NeedPeerCache { zid, rs_id_hint } => {
                    let cache = lb.lookup(&zid, rs_id_hint)?;
                    if let Err(e) = b.provide_peer_cache(cache, 0, rng) {
                        lb.failed(&e, unix_now)?;
                        res_b = Some(Err(e));
                    }
                }
                Event::Established(o) => {
                    lb.succeeded(&o, unix_now)?;
                    res_b = Some(Ok(o));
                }
            }
        }
        if let Some(ae) = a.as_mut() {
            while let Some(m) = b.poll_transmit() {
                moved = true;
                if res_a.is_none() {
                    if let Err(e) = ae.handle_message(&m, 0, rng) {
                        la.failed(&e, unix_now)?;
                        res_a = Some(Err(e));
                    }
                }
            }
            while let Some(ev) = ae.poll_event() {
                moved = true;
                match ev {
                    Event::NeedPeerCache { zid, rs_id_hint } => {
                        let cache = la.lookup(&zid, rs_id_hint)?;
                        if let Err(e) = ae.provide_peer_cache(cache, 0, rng) {
                            la.failed(&e, unix_now)?;
                            res_a = Some(Err(e));
                        }
                    }
                    Event::Established(o) => {
                        la.succeeded(&o, unix_now)?;
                        res_a = Some(Ok(o));
                    }
                }
            }
        }
        if !moved || (res_a.is_some() && res_b.is_some()) {
            break;
        }
    }
    let incomplete = || Err(keav_proto::Error::Timeout);
    Ok(PairResult {
        initiator: res_a.unwrap_or_else(incomplete),
        responder: res_b.unwrap_or_else(incomplete),
    })
}
