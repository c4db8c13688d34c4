//! keav's sans-IO endpoint as a [`Peer`], speaking RFC 6189 packets (sequence number, SSRC,
//! CRC-32c) like a datagram link would.

use keav_proto::cache::{Mode, PeerCache, Zid};
use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup, SessionOutcome};
use keav_proto::packet::{decode_packet, encode_packet};
use rand_core::OsRng;

use crate::driver::Peer;

/// Which ZRTP role keav starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// keav sends Hello first and Commits (commit contention may still make it responder).
    Initiator,
    /// keav waits for the peer's Hello and never Commits.
    Responder,
}

/// One keav endpoint for one session, with the peer cache it starts from.
pub struct KeavPeer {
    start: Start,
    zid: Zid,
    ssrc: u32,
    seq: u16,
    cache: Option<PeerCache>,
    endpoint: Option<Endpoint>,
    outgoing: Vec<Vec<u8>>,
    outcome: Option<Box<SessionOutcome>>,
    error: Option<keav_proto::Error>,
    sas_types: Option<Vec<keav_proto::sas::SasType>>,
}

impl KeavPeer {
    /// A keav device with this ZID (stable across sessions: normal mode), starting from
    /// `cache` (what it remembers about the peer).
    pub fn new(start: Start, zid: Zid, ssrc: u32, cache: Option<PeerCache>) -> Self {
        Self {
            start,
            zid,
            ssrc,
            seq: 0,
            cache,
            endpoint: None,
            outgoing: Vec::new(),
            outcome: None,
            error: None,
            sas_types: None,
        }
    }

    /// Overrides the SAS rendering preference (default: B32, then B256).
    pub fn with_sas_types(mut self, sas: Vec<keav_proto::sas::SasType>) -> Self {
        self.sas_types = Some(sas);
        self
    }

    /// The completed session, if any.
    pub fn outcome(&self) -> Option<&SessionOutcome> {
        self.outcome.as_deref()
    }

    /// The error that ended the session, if any.
    pub fn error(&self) -> Option<&keav_proto::Error> {
        self.error.as_ref()
    }

    /// The cache to start the next session from (the old one updated by this session).
    pub fn next_cache(&self) -> Option<PeerCache> {
        let mut c = self.cache.clone();
        if let Some(u) = self.outcome.as_ref().and_then(|o| o.cache_update.as_ref()) {
            let c = c.get_or_insert_with(PeerCache::default);
            c.rs2 = u.rs2.clone();
            c.rs1 = Some(u.rs1.clone());
            c.expires_at = u.expires_at;
            c.sessions = u.sessions;
        }
        c
    }

    fn config(&self) -> Config {
        // Plain ZRTP peer: no KEAV verification on its side, the SAS is for a person.
        let mut cfg = Config::new(self.zid, Mode::NORMAL);
        cfg.require_keav = false;
        if let Some(s) = &self.sas_types {
            cfg.sas_types = s.clone();
        }
        cfg
    }

    fn pump(&mut self, now_ms: u64) {
        let Some(ep) = self.endpoint.as_mut() else {
            return;
        };
        while let Some(ev) = ep.poll_event() {
            match ev {
                Event::NeedPeerCache { .. } => {
                    if let Err(e) = ep.provide_peer_cache(self.cache.clone(), now_ms, &mut OsRng) {
                        self.error.get_or_insert(e);
                    }
                }
                Event::Established(o) => self.outcome = Some(o),
                _ => {}
            }
        }
        while let Some(m) = ep.poll_transmit() {
            // bzrtp drops packets whose sequence number does not increase, so every
            // (re)transmission gets a new one.
            self.seq = self.seq.wrapping_add(1);
            self.outgoing.push(encode_packet(self.seq, self.ssrc, &m));
        }
    }
}

fn code(e: &keav_proto::Error) -> i32 {
    i32::try_from(e.wire_code()).unwrap_or(i32::MAX)
}

impl Peer for KeavPeer {
    fn start(&mut self, now_ms: u64) -> Result<(), i32> {
        let unix = 1_800_000_000;
        let ep = match self.start {
            Start::Initiator => {
                Endpoint::initiator(self.config(), PeerLookup::AtHello, now_ms, unix, &mut OsRng)
                    .map_err(|e| code(&e))?
            }
            Start::Responder => Endpoint::responder(self.config(), now_ms, unix, &mut OsRng),
        };
        self.endpoint = Some(ep);
        self.pump(now_ms);
        Ok(())
    }

    fn process(&mut self, packet: &[u8], now_ms: u64) -> Result<(), i32> {
        let ep = self.endpoint.as_mut().ok_or(0x20)?;
        let p = decode_packet(packet).map_err(|_| 0x10)?;
        let r = match ep.handle_message(p.message, now_ms, &mut OsRng) {
            Ok(()) => Ok(()),
            Err(e) => {
                let c = code(&e);
                self.error.get_or_insert(e);
                Err(c)
            }
        };
        self.pump(now_ms);
        r
    }

    fn iterate(&mut self, now_ms: u64) -> Result<(), i32> {
        let Some(ep) = self.endpoint.as_mut() else {
            return Ok(());
        };
        if ep.poll_timeout().is_some_and(|t| t <= now_ms) {
            if let Err(e) = ep.handle_timeout(now_ms) {
                let c = code(&e);
                self.error.get_or_insert(e);
                self.pump(now_ms);
                return Err(c);
            }
        }
        self.pump(now_ms);
        Ok(())
    }

    fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outgoing)
    }

    fn is_secure(&self) -> bool {
        self.outcome.is_some()
    }
}
