//! Drives two real KEAV endpoints against each other while the fuzzer decides, message by
//! message, to deliver, drop, duplicate, corrupt, hold back or replace it, and fires timers.
//!
//! Checks: nothing panics; a side that completes has the same exported key as the other side
//! if that one completes too; a completed side never completes twice.
#![no_main]

use keav_proto::cache::{Mode, Zid};
use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup};
use keav_verify::{Backend, VerifySecret};
use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Tape<'a>(&'a [u8]);

impl Tape<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tape = Tape(data);
    let Some(setup) = tape.byte() else { return };
    let mode = match setup % 3 {
        0 => Mode::NoContinuity,
        1 => Mode::Normal { verify_every: 2 },
        _ => Mode::Paranoid,
    };
    let backend = if setup & 0x08 == 0 { Backend::CPace } else { Backend::Smp };
    let same_secret = setup & 0x10 == 0;
    let mut rng = StdRng::seed_from_u64(u64::from(setup));
    let cfg = |zid: u8, secret: &[u8]| {
        let mut c = Config::new(Zid([zid; 12]), mode);
        c.backends = vec![backend];
        c.verify_secret = Some(VerifySecret::new(secret.to_vec()));
        c
    };
    let Ok(mut a) = Endpoint::initiator(cfg(1, b"code"), PeerLookup::Given(None), 0, 1, &mut rng) else {
        return;
    };
    let mut b = Endpoint::responder(
        cfg(2, if same_secret { b"code" } else { b"other" }),
        0,
        1,
        &mut rng,
    );
    let mut keys: [Option<[u8; 32]>; 2] = [None, None];
    let mut held: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut now = 0u64;
    for _ in 0..200 {
        let mut flight: Vec<(bool, Vec<u8>)> = Vec::new();
        while let Some(m) = a.poll_transmit() {
            flight.push((true, m));
        }
        while let Some(m) = b.poll_transmit() {
            flight.push((false, m));
        }
        for (i, ep) in [&mut a, &mut b].into_iter().enumerate() {
            while let Some(ev) = ep.poll_event() {
                match ev {
                    Event::NeedPeerCache { .. } => {
                        let _ = ep.provide_peer_cache(None, now, &mut rng);
                    }
                    Event::Established(o) => {
                        assert!(keys[i].is_none(), "established twice");
                        keys[i] = Some(*o.exported_key.expose());
                    }
                    _ => {}
                }
            }
        }
        if flight.is_empty() && held.is_empty() {
            // Nothing in flight: let time pass.
            now += 200;
            let _ = a.handle_timeout(now);
            let _ = b.handle_timeout(now);
            if a.poll_timeout().is_none() && b.poll_timeout().is_none() {
                break;
            }
            continue;
        }
        flight.append(&mut held);
        for (to_b, mut m) in flight {
            let op = tape.byte().unwrap_or(0);
            match op % 8 {
                4 => continue,
                5 => {
                    deliver(&mut a, &mut b, to_b, &m, now, &mut rng);
                }
                6 => {
                    if !m.is_empty() {
                        let pos = usize::from(tape.byte().unwrap_or(0)) % m.len();
                        m[pos] ^= tape.byte().unwrap_or(1) | 1;
                    }
                }
                7 => {
                    held.push((to_b, m));
                    continue;
                }
                3 => {
                    let n = usize::from(tape.byte().unwrap_or(0));
                    m = tape.bytes(n).to_vec();
                }
                _ => {}
            }
            deliver(&mut a, &mut b, to_b, &m, now, &mut rng);
        }
        now += 10;
    }
    if let [Some(x), Some(y)] = keys {
        assert_eq!(x, y, "both sides completed with different keys");
    }
});

fn deliver(a: &mut Endpoint, b: &mut Endpoint, to_b: bool, m: &[u8], now: u64, rng: &mut StdRng) {
    let ep = if to_b { b } else { a };
    let _ = ep.handle_message(m, now, rng);
}
