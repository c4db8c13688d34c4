//! Helpers shared by the integration tests.
#![allow(dead_code)]

use keav_verify::{Backend, Binding, Error, Role, Verifier, VerifySecret};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha512};

/// Deterministic, reproducible byte stream: SHA-512(seed || counter) blocks.
/// Test only: it is "CryptoRng" only so that the API accepts it.
pub struct TestRng {
    seed: Vec<u8>,
    counter: u64,
    buf: Vec<u8>,
}

impl TestRng {
    pub fn new(seed: &[u8]) -> TestRng {
        TestRng {
            seed: seed.to_vec(),
            counter: 0,
            buf: Vec::new(),
        }
    }
}

impl RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest.iter_mut() {
            if self.buf.is_empty() {
                let mut h = Sha512::new();
                h.update(&self.seed);
                h.update(self.counter.to_be_bytes());
                self.counter += 1;
                self.buf = h.finalize().to_vec();
            }
            *d = self.buf.remove(0);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for TestRng {}

/// How one side's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `is_finished()` and no error.
    Equal,
    /// `receive` returned this error.
    Failed(Error),
    /// No error, but the run did not finish (waiting for a message that never came).
    Incomplete,
}

pub struct Pair {
    pub initiator: Verifier,
    pub responder: Verifier,
    pub i_end: End,
    pub r_end: End,
    /// Every message exchanged, in order.
    pub transcript: Vec<Vec<u8>>,
}

/// Start one side (panics on error: start never fails).
pub fn start<R: RngCore + CryptoRng>(
    backend: Backend,
    role: Role,
    binding: &Binding,
    secret: Option<&VerifySecret>,
    rng: &mut R,
) -> (Verifier, Option<Vec<u8>>) {
    Verifier::start(backend, role, binding, secret, rng).expect("start")
}

/// Drive one side with a message, turning the outcome into the next message
/// to deliver (including the SMP responder's final message after NotEqual).
pub fn deliver<R: RngCore + CryptoRng>(
    v: &mut Verifier,
    msg: &[u8],
    end: &mut End,
    rng: &mut R,
) -> Option<Vec<u8>> {
    match v.receive(msg, rng) {
        Ok(reply) => {
            if v.is_finished() {
                *end = End::Equal;
            }
            reply
        }
        Err(e) => {
            *end = End::Failed(e);
            v.take_final_message()
        }
    }
}

/// Run a whole test between an initiator and a responder, delivering every
/// message in order.
pub fn run_pair<R: RngCore + CryptoRng>(
    backend: Backend,
    (bi, si): (&Binding, Option<&VerifySecret>),
    (br, sr): (&Binding, Option<&VerifySecret>),
    rng: &mut R,
) -> Pair {
    let (mut initiator, first) = start(backend, Role::Initiator, bi, si, rng);
    let (mut responder, none) = start(backend, Role::Responder, br, sr, rng);
    assert!(none.is_none(), "the responder never speaks first");
    let mut i_end = End::Incomplete;
    let mut r_end = End::Incomplete;
    let mut transcript = Vec::new();
    let mut next = first;
    let mut to_responder = true;
    while let Some(msg) = next.take() {
        transcript.push(msg.clone());
        next = if to_responder {
            deliver(&mut responder, &msg, &mut r_end, rng)
        } else {
            deliver(&mut initiator, &msg, &mut i_end, rng)
        };
        to_responder = !to_responder;
        assert!(transcript.len() <= 4, "too many messages");
    }
    Pair {
        initiator,
        responder,
        i_end,
        r_end,
        transcript,
    }
}

pub fn binding(tag: u8) -> Binding {
    let mut ctx = vec![0u8; 12 + 12 + 32];
    ctx[..12].copy_from_slice(b"ZID-initiatr");
    ctx[12..24].copy_from_slice(b"ZID-respondr");
    ctx[24..].fill(tag);
    Binding::new(&[tag ^ 0x5a; 32], &ctx)
}
