//! Test support: in-memory devices with caches, a lossy link with simulated time, and a
//! driver that runs one session between two devices.
#![allow(dead_code, missing_docs)]

use keav_proto::cache::{LockoutPolicy, Mode, PeerCache, Verification, Zid};
use keav_proto::crypto;
use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup, SessionOutcome};
use keav_proto::Error;
use keav_verify::VerifySecret;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a device remembers about one peer (the in-memory stand-in for keav-store).
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Local label the device uses when it calls this peer.
    pub label: String,
    pub zid: Option<Zid>,
    pub cache: PeerCache,
    pub failures: u32,
}

/// A device: identity, mode, secret, and its peers.
pub struct Device {
    pub name: String,
    pub zid: Zid,
    pub mode: Mode,
    pub secret: Option<Vec<u8>>,
    pub peers: Vec<PeerEntry>,
    pub lockout: LockoutPolicy,
    pub allow_repair: bool,
    pub require_keav: bool,
    pub backends: Vec<keav_verify::Backend>,
}

impl Device {
    pub fn new(name: &str, mode: Mode, seed: u8) -> Self {
        let mut z = [seed; 12];
        z[0] = name.as_bytes()[0];
        Self {
            name: name.to_string(),
            zid: Zid(z),
            mode,
            secret: None,
            peers: Vec::new(),
            lockout: LockoutPolicy::default(),
            allow_repair: false,
            require_keav: true,
            backends: vec![keav_verify::Backend::CPace, keav_verify::Backend::Smp],
        }
    }

    pub fn with_secret(mut self, s: &[u8]) -> Self {
        self.secret = Some(s.to_vec());
        self
    }

    pub fn config(&self) -> Config {
        let mut c = Config::new(self.zid, self.mode);
        c.verify_secret = self.secret.clone().map(VerifySecret::new);
        c.lockout = self.lockout;
        c.allow_repair = self.allow_repair;
        c.require_keav = self.require_keav;
        c.backends = self.backends.clone();
        c
    }

    pub fn entry_by_label(&mut self, label: &str) -> Option<&mut PeerEntry> {
        self.peers.iter_mut().find(|p| p.label == label)
    }

    pub fn entry(&self, label: &str) -> Option<&PeerEntry> {
        self.peers.iter().find(|p| p.label == label)
    }

    /// Responder-side lookup, only by what the protocol tells: ZID, or rs-ID hint (paranoid).
    fn lookup(&self, zid: Zid, hint: Option<[u8; 8]>) -> Option<usize> {
        match hint {
            Some(id) => self.peers.iter().position(|p| {
                [p.cache.rs1.as_ref(), p.cache.rs2.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|rs| crypto::rs_id(rs, b"Initiator") == id)
            }),
            None => self.peers.iter().position(|p| p.zid == Some(zid)),
        }
    }
}

/// Link model: loss, duplication, reordering, delay, all from a seeded RNG.
#[derive(Clone, Copy, Debug)]
pub struct LinkModel {
    pub drop: f64,
    pub dup: f64,
    pub reorder: f64,
    pub delay_ms: u64,
}

impl LinkModel {
    pub const PERFECT: LinkModel = LinkModel {
        drop: 0.0,
        dup: 0.0,
        reorder: 0.0,
        delay_ms: 5,
    };
    pub const LOSSY: LinkModel = LinkModel {
        drop: 0.1,
        dup: 0.1,
        reorder: 0.2,
        delay_ms: 5,
    };
}

/// A message in flight.
struct InFlight {
    at: u64,
    to_b: bool,
    bytes: Vec<u8>,
}

/// Hook to inspect or tamper with messages: (direction a->b, index of message on this
/// direction, bytes) -> replacement (None = drop).
pub type Tamper<'a> = &'a mut dyn FnMut(bool, usize, Vec<u8>) -> Option<Vec<u8>>;

/// Result of one side of a session.
pub type Side = Result<Box<SessionOutcome>, Error>;

pub struct SessionResult {
    pub a: Side,
    pub b: Side,
    /// Messages each direction carried (after tampering), for replay tests.
    pub a_to_b: Vec<Vec<u8>>,
    pub b_to_a: Vec<Vec<u8>>,
}

/// Runs one session: `a` initiates (calling `b` by label), `b` responds.
/// Applies the outcomes to both devices' caches like a store would.
pub fn run_session(
    a: &mut Device,
    b: &mut Device,
    link: LinkModel,
    seed: u64,
    unix_now: u64,
    tamper: Option<Tamper<'_>>,
) -> SessionResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut link_rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut now = 0u64;
    let known = a.entry(&b.name).map(|e| e.cache.clone());
    let mut ea = match Endpoint::initiator(
        a.config(),
        PeerLookup::Given(known),
        now,
        unix_now,
        &mut rng,
    ) {
        Ok(e) => e,
        Err(e) => {
            return SessionResult {
                a: Err(e),
                b: Err(Error::Timeout),
                a_to_b: vec![],
                b_to_a: vec![],
            }
        }
    };
    let mut eb = Endpoint::responder(b.config(), now, unix_now, &mut rng);
    let mut res_a: Option<Side> = None;
    let mut res_b: Option<Side> = None;
    let mut queue: Vec<InFlight> = Vec::new();
    let mut a_to_b = Vec::new();
    let mut b_to_a = Vec::new();
    let mut tamper = tamper;
    let mut b_lookup_idx: Option<usize> = None;
    for _round in 0..100_000 {
        // Drain outputs into the link.
        for (ep, to_b) in [(&mut ea, true), (&mut eb, false)] {
            while let Some(m) = ep.poll_transmit() {
                let idx = if to_b { a_to_b.len() } else { b_to_a.len() };
                let m = match tamper.as_mut() {
                    Some(t) => match t(to_b, idx, m) {
                        Some(m) => m,
                        None => {
                            if to_b {
                                a_to_b.push(Vec::new());
                            } else {
                                b_to_a.push(Vec::new());
                            }
                            continue;
                        }
                    },
                    None => m,
                };
                if to_b {
                    a_to_b.push(m.clone());
                } else {
                    b_to_a.push(m.clone());
                }
                if std::env::var_os("KEAV_TRACE").is_some() {
                    let t = keav_proto::msg::peek_type(&m)
                        .map(|t| t.name())
                        .unwrap_or("?");
                    eprintln!(
                        "{now:>6} {} {t} ({} bytes)",
                        if to_b { "A->B" } else { "B->A" },
                        m.len()
                    );
                }
                if link_rng.gen_bool(link.drop) {
                    continue;
                }
                let copies = if link_rng.gen_bool(link.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    let extra = if link_rng.gen_bool(link.reorder) {
                        link_rng.gen_range(0..30)
                    } else {
                        0
                    };
                    queue.push(InFlight {
                        at: now + link.delay_ms + extra,
                        to_b,
                        bytes: m.clone(),
                    });
                }
            }
        }
        // Events.
        while let Some(ev) = ea.poll_event() {
            match ev {
                Event::Established(o) => res_a = Some(Ok(o)),
                Event::NeedPeerCache { .. } => unreachable!("initiator was given its cache"),
                _ => {}
            }
        }
        while let Some(ev) = eb.poll_event() {
            match ev {
                Event::Established(o) => res_b = Some(Ok(o)),
                Event::NeedPeerCache { zid, rs_id_hint } => {
                    b_lookup_idx = b.lookup(zid, rs_id_hint);
                    let c = b_lookup_idx.map(|i| b.peers[i].cache.clone());
                    if let Err(e) = eb.provide_peer_cache(c, now, &mut rng) {
                        res_b = Some(Err(e));
                    }
                }
                _ => {}
            }
        }
        let a_done = res_a.is_some() || ea.is_failed();
        let b_done = res_b.is_some() || eb.is_failed();
        if a_done && b_done && queue.is_empty() {
            break;
        }
        // Next time step: earliest delivery or timer.
        let next_msg = queue.iter().map(|m| m.at).min();
        let next_timer = [ea.poll_timeout(), eb.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let next = match (next_msg, next_timer) {
            (Some(x), Some(y)) => x.min(y),
            (Some(x), None) => x,
            (None, Some(y)) => y,
            (None, None) => break,
        };
        now = now.max(next);
        // Deliver due messages in order of arrival time.
        queue.sort_by_key(|m| m.at);
        let due: Vec<InFlight> = {
            let (d, rest): (Vec<_>, Vec<_>) = queue.drain(..).partition(|m| m.at <= now);
            queue = rest;
            d
        };
        for m in due {
            let (ep, slot) = if m.to_b {
                (&mut eb, &mut res_b)
            } else {
                (&mut ea, &mut res_a)
            };
            if ep.is_failed() {
                continue;
            }
            if let Err(e) = ep.handle_message(&m.bytes, now, &mut rng) {
                if slot.is_none() {
                    *slot = Some(Err(e));
                }
            }
        }
        for (ep, slot) in [(&mut ea, &mut res_a), (&mut eb, &mut res_b)] {
            if ep.poll_timeout().is_some_and(|t| t <= now) {
                if let Err(e) = ep.handle_timeout(now) {
                    if slot.is_none() {
                        *slot = Some(Err(e));
                    }
                }
            }
        }
    }
    let res_a = res_a.unwrap_or(Err(Error::Timeout));
    let res_b = res_b.unwrap_or(Err(Error::Timeout));
    apply(a, &b.name.clone(), None, &res_a, unix_now);
    apply(b, &a.name.clone(), Some(b_lookup_idx), &res_b, unix_now);
    SessionResult {
        a: res_a,
        b: res_b,
        a_to_b,
        b_to_a,
    }
}

/// Persist an outcome like the store would: commit on success, count failures.
fn apply(d: &mut Device, peer_label: &str, found: Option<Option<usize>>, r: &Side, unix_now: u64) {
    let idx = match found {
        // Responder: the entry the protocol lookup found; a new peer gets a fresh entry whose
        // label is the peer's name (for the test's own inspection only).
        Some(i) => i,
        None => d.peers.iter().position(|p| p.label == peer_label),
    };
    match r {
        Ok(o) => {
            let idx = match idx {
                Some(i) => i,
                None => {
                    d.peers.push(PeerEntry {
                        label: peer_label.to_string(),
                        zid: None,
                        cache: PeerCache::default(),
                        failures: 0,
                    });
                    d.peers.len() - 1
                }
            };
            let e = &mut d.peers[idx];
            e.zid = Some(o.peer_zid);
            if let Some(u) = &o.cache_update {
                e.cache.rs2 = u.rs2.clone();
                e.cache.rs1 = Some(u.rs1.clone());
                e.cache.expires_at = u.expires_at;
                e.cache.sessions = u.sessions;
                e.cache.verify_due = false;
            } else {
                e.cache.sessions = o.session_number;
            }
            if matches!(o.verification, Verification::Bound | Verification::Unbound) {
                e.failures = 0;
                e.cache.locked_until = None;
            }
        }
        Err(err) if err.counts_toward_lockout() => {
            // The initiator knows whom it called: a first failed contact still gets an entry
            // (a responder charges unidentified peers to an anonymous bucket, not modelled).
            let idx = match (idx, found) {
                (None, None) => {
                    d.peers.push(PeerEntry {
                        label: peer_label.to_string(),
                        zid: None,
                        cache: PeerCache::default(),
                        failures: 0,
                    });
                    Some(d.peers.len() - 1)
                }
                (i, _) => i,
            };
            if let Some(i) = idx {
                let lockout = d.lockout;
                let e = &mut d.peers[i];
                e.failures += 1;
                e.cache.locked_until = lockout.locked_until(e.failures, unix_now);
                e.cache.verify_due = true;
            }
        }
        Err(_) => {}
    }
}

/// Asserts both sides succeeded with the same keys and SAS; returns the outcomes.
pub fn both_ok(r: &SessionResult) -> (&SessionOutcome, &SessionOutcome) {
    let a = match &r.a {
        Ok(o) => o,
        Err(e) => panic!(
            "initiator failed: {e:?} (responder: {:?})",
            r.b.as_ref().err()
        ),
    };
    let b = match &r.b {
        Ok(o) => o,
        Err(e) => panic!(
            "responder failed: {e:?} (initiator: {:?})",
            r.a.as_ref().err()
        ),
    };
    assert_eq!(a.exported_key, b.exported_key, "exported keys differ");
    assert_eq!(a.sas, b.sas, "SAS differ");
    assert_eq!(a.key_agreement, b.key_agreement);
    assert_eq!(a.verification.ran(), b.verification.ran());
    (a, b)
}
