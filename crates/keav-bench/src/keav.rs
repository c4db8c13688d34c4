//! In-memory keav sessions: two endpoints pumped against each other.

use std::time::{Duration, Instant};

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

    /// The handshake configuration of this device. A device that offers no equality test
    /// is a plain RFC 6189 device: it does not require KEAV from its peer either.
    pub fn config(&self) -> Config {
        let mut cfg = Config::new(self.zid, self.mode);
        cfg.backends = self.backends.clone();
        cfg.require_keav = !self.backends.is_empty();
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
        Self::first_session(Backend::CPace).advanced(rng)
    }

    /// The same devices with both in key-continuity `mode`.
    pub fn in_mode(mut self, mode: Mode) -> Self {
        self.initiator.mode = mode;
        self.responder.mode = mode;
        self
    }

    /// The same devices offering no equality test: plain RFC 6189 ZRTP (DH, SAS left to
    /// the users), with KEAV verification turned off on both sides.
    pub fn without_verification(mut self) -> Self {
        self.initiator.backends.clear();
        self.responder.backends.clear();
        self
    }

    /// Runs one session from this setup and records it in both devices' caches: the setup
    /// of the next session.
    pub fn advanced<R: RngCore + CryptoRng>(mut self, rng: &mut R) -> Result<Self, BenchError> {
        let o = run_keav_handshake(&self, rng)?;
        self.initiator.remember(&o.initiator);
        self.responder.remember(&o.responder);
        Ok(self)
    }
}

/// What one side of a handshake did: the CPU it spent and what it put on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SideStats {
    /// Time spent inside this side's calls (creating its endpoint or connection, processing
    /// input, producing output), measured with [`Instant`] around every call. The drivers run
    /// single-threaded without I/O, so this is CPU time.
    pub cpu: Duration,
    /// Messages this side sent (keav: RFC 6189 packets; TLS: records; Noise: handshake
    /// messages).
    pub messages: u32,
    /// Bytes this side sent, as on the wire without IP/UDP/TCP headers (see each driver).
    pub bytes: u64,
}

/// Both sides' accounting of one handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeStats {
    /// The initiator (client).
    pub initiator: SideStats,
    /// The responder (server).
    pub responder: SideStats,
    /// One-way flights until the initiator (client) was done: the causal depth of the last
    /// message it received before it completed. A message sent by X has depth 1 + the
    /// largest depth X has received so far (1 if none).
    pub flights: u32,
}

/// One message a driver moved from one side to the other (see the `*_traced` drivers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentMessage {
    /// Sent by the initiator (client); `false` = by the responder (server).
    pub from_initiator: bool,
    /// The bytes as counted on the wire (keav: the RFC 6189 packet; TLS: one record; Noise:
    /// length prefix + message).
    pub bytes: Vec<u8>,
    /// Causal depth (flight number) of the message.
    pub depth: u32,
}

/// Causal-depth bookkeeping shared by the drivers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Depths {
    /// Largest depth received so far by the initiator / responder.
    recv: [u32; 2],
}

impl Depths {
    fn idx(initiator: bool) -> usize {
        usize::from(!initiator)
    }
    /// Depth of a message sent now by `initiator` (true) or the responder.
    pub(crate) fn send(&self, initiator: bool) -> u32 {
        self.recv[Self::idx(initiator)] + 1
    }
    /// The side `initiator` received a message of depth `d`.
    pub(crate) fn recv(&mut self, initiator: bool, d: u32) {
        let r = &mut self.recv[Self::idx(initiator)];
        *r = (*r).max(d);
    }
    /// Largest depth received so far by the side.
    pub(crate) fn received(&self, initiator: bool) -> u32 {
        self.recv[Self::idx(initiator)]
    }
}

/// Runs `f` and adds the time it took to `cpu`.
#[inline]
pub(crate) fn timed<T>(cpu: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *cpu += t.elapsed();
    r
}

/// Both sides' results of one completed session.
#[derive(Debug)]
pub struct KeavOutcome {
    /// The initiator's outcome.
    pub initiator: Box<SessionOutcome>,
    /// The responder's outcome.
    pub responder: Box<SessionOutcome>,
    /// Per-side CPU, messages and bytes, and flights. Bytes are RFC 6189 packets as sent
    /// over UDP: the endpoint's bare message plus the 12-byte packet header and the 4-byte
    /// CRC ([`KEAV_PACKET_OVERHEAD`]); the framing itself is not executed, so the CPU
    /// figures are the endpoints' alone.
    pub stats: HandshakeStats,
}

/// Bytes RFC 6189 §5 adds around each message on a datagram link (header + CRC-32c).
pub const KEAV_PACKET_OVERHEAD: usize =
    keav_proto::packet::PACKET_HEADER_LEN + keav_proto::packet::CRC_LEN;

/// Runs one complete keav session between the two devices of `setup`, in memory, and checks
/// that both sides released the same exported key and SAS.
///
/// The caches in `setup` are cloned into the endpoints and left unchanged, so the same setup
/// can be run again from the same state (use [`DeviceSetup::remember`] to advance it).
pub fn run_keav_handshake<R: RngCore + CryptoRng>(
    setup: &KeavSetup,
    rng: &mut R,
) -> Result<KeavOutcome, BenchError> {
    drive(setup, rng, None)
}

/// Like [`run_keav_handshake`], and also returns every message moved, wrapped in the
/// RFC 6189 packet it would travel in over UDP (sequence numbers from 1 per side).
pub fn run_keav_handshake_traced<R: RngCore + CryptoRng>(
    setup: &KeavSetup,
    rng: &mut R,
) -> Result<(KeavOutcome, Vec<SentMessage>), BenchError> {
    let mut trace = Vec::new();
    let o = drive(setup, rng, Some(&mut trace))?;
    Ok((o, trace))
}

/// Moves everything `from` has queued into `to`, timing each side's calls and counting
/// what `from` sent.
#[allow(clippy::too_many_arguments)]
fn pump<R: RngCore + CryptoRng>(
    from_initiator: bool,
    from: &mut Endpoint,
    to: &mut Endpoint,
    st: &mut HandshakeStats,
    depths: &mut Depths,
    trace: &mut Option<&mut Vec<SentMessage>>,
    now: u64,
    rng: &mut R,
) -> Result<bool, BenchError> {
    let mut moved = false;
    loop {
        let (tx, rx) = if from_initiator {
            (&mut st.initiator, &mut st.responder)
        } else {
            (&mut st.responder, &mut st.initiator)
        };
        let Some(m) = timed(&mut tx.cpu, || from.poll_transmit()) else {
            break;
        };
        moved = true;
        let d = depths.send(from_initiator);
        tx.messages += 1;
        tx.bytes += (m.len() + KEAV_PACKET_OVERHEAD) as u64;
        if let Some(t) = trace.as_deref_mut() {
            let seq = t
                .iter()
                .filter(|s| s.from_initiator == from_initiator)
                .count() as u16
                + 1;
            let ssrc = if from_initiator {
                0x0a11_ce01
            } else {
                0x0b0b_0002
            };
            t.push(SentMessage {
                from_initiator,
                bytes: keav_proto::packet::encode_packet(seq, ssrc, &m),
                depth: d,
            });
        }
        depths.recv(!from_initiator, d);
        timed(&mut rx.cpu, || to.handle_message(&m, now, rng))?;
    }
    Ok(moved)
}

fn drive<R: RngCore + CryptoRng>(
    setup: &KeavSetup,
    rng: &mut R,
    mut trace: Option<&mut Vec<SentMessage>>,
) -> Result<KeavOutcome, BenchError> {
    let now = 0;
    let unix = BENCH_UNIX_NOW;
    let mut st = HandshakeStats::default();
    let mut depths = Depths::default();
    let (cfg_a, cfg_b) = (setup.initiator.config(), setup.responder.config());
    let lookup = PeerLookup::Given(setup.initiator.cache.clone());
    let mut a = timed(&mut st.initiator.cpu, || {
        Endpoint::initiator(cfg_a, lookup, now, unix, rng)
    })?;
    let mut b = timed(&mut st.responder.cpu, || {
        Endpoint::responder(cfg_b, now, unix, rng)
    });
    let (mut out_a, mut out_b) = (None, None);
    for _ in 0..MAX_ROUNDS {
        let mut moved = pump(
            true,
            &mut a,
            &mut b,
            &mut st,
            &mut depths,
            &mut trace,
            now,
            rng,
        )?;
        while let Some(ev) = timed(&mut st.responder.cpu, || b.poll_event()) {
            moved = true;
            match ev {
                Event::NeedPeerCache { .. } => {
                    timed(&mut st.responder.cpu, || {
                        b.provide_peer_cache(setup.responder.cache.clone(), now, rng)
                    })?;
                }
                Event::Established(o) => out_b = Some(o),
                // No attempt ledger in a benchmark.
                _ => {}
            }
        }
        moved |= pump(
            false,
            &mut b,
            &mut a,
            &mut st,
            &mut depths,
            &mut trace,
            now,
            rng,
        )?;
        while let Some(ev) = timed(&mut st.initiator.cpu, || a.poll_event()) {
            moved = true;
            match ev {
                Event::NeedPeerCache { .. } => {
                    timed(&mut st.initiator.cpu, || {
                        a.provide_peer_cache(setup.initiator.cache.clone(), now, rng)
                    })?;
                }
                Event::Established(o) => {
                    if out_a.is_none() {
                        st.flights = depths.received(true);
                    }
                    out_a = Some(o);
                }
                _ => {}
            }
        }
        if (out_a.is_some() && out_b.is_some()) || !moved {
            break;
        }
    }
    // Whatever is still queued (e.g. a last acknowledgement) goes on the wire too.
    pump(
        true,
        &mut a,
        &mut b,
        &mut st,
        &mut depths,
        &mut trace,
        now,
        rng,
    )?;
    pump(
        false,
        &mut b,
        &mut a,
        &mut st,
        &mut depths,
        &mut trace,
        now,
        rng,
    )?;
    match (out_a, out_b) {
        (Some(initiator), Some(responder)) => {
            if initiator.exported_key != responder.exported_key || initiator.sas != responder.sas {
                return Err(BenchError::KeyMismatch("keav"));
            }
            Ok(KeavOutcome {
                initiator,
                responder,
                stats: st,
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
