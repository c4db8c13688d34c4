//! Maliciously secure two-party equality tests for KEAV's autonomous
//! man-in-the-middle detection (PROTOCOL.md §3).
//!
//! After the ZRTP-style Diffie-Hellman exchange, the two devices check that they
//! saw the *same* session and that both know the same *verification secret*,
//! without a human reading a SAS aloud. Two backends are offered:
//!
//! * [`Backend::CPace`] (default): the CFRG balanced PAKE CPace
//!   (draft-irtf-cfrg-cpace-21, cipher suite `CPACE-RISTR255-SHA512`,
//!   initiator-responder setting) followed by explicit key confirmation.
//!   Besides the equality bit it yields a 32-byte key ([`Verifier::key`]) the
//!   handshake mixes into its session keys.
//! * [`Backend::Smp`]: the Socialist Millionaires' Protocol of OTR v3 with all
//!   its zero-knowledge proofs, re-expressed on ristretto255 with SHA-512
//!   challenges. A literal equality test; it yields no key.
//!
//! Both give an active attacker at most one guess of the secret per run and leak
//! nothing but the equality bit. The crate is sans-IO: it consumes and produces
//! payload bytes only; the handshake carries them in MAC'd wire messages.
//!
//! # Call order
//!
//! ```text
//! Initiator                                Responder
//! Verifier::start -> Some(m1)              Verifier::start -> None
//!            ---------------- m1 ---------------->
//!                                          receive(m1) -> Some(m2)
//!            <--------------- m2 -----------------
//! receive(m2) -> Some(m3)
//!            ---------------- m3 ---------------->
//!                                          receive(m3) -> Some(m4) (SMP) / None (CPace)
//!            <--------------- m4 ----------------- (SMP only)
//! receive(m4) -> None (SMP)
//! ```
//!
//! | backend | message | bytes | content |
//! |---|---|---|---|
//! | CPace | I→R | 32 | `Ya` |
//! | CPace | R→I | 64 | `Yb ‖ Tb` |
//! | CPace | I→R | 32 | `Ta` |
//! | SMP | I→R msg1 | 192 | `g2a ‖ g3a ‖ c2 ‖ D2 ‖ c3 ‖ D3` |
//! | SMP | R→I msg2 | 352 | `g2b ‖ g3b ‖ Pb ‖ Qb ‖ c2 ‖ D2 ‖ c3 ‖ D3 ‖ cP ‖ D5 ‖ D6` |
//! | SMP | I→R msg3 | 256 | `Pa ‖ Qa ‖ Ra ‖ cP ‖ D5 ‖ D6 ‖ cR ‖ D7` |
//! | SMP | R→I msg4 | 96 | `Rb ‖ cR ‖ D7` |
//!
//! Points are canonical ristretto255 encodings, scalars canonical 32-byte
//! little-endian encodings. Every message has one exact length.
//!
//! [`Verifier::ready_for_confirm`] says when this side may send its ZRTP
//! Confirm: CPace responder after sending `Yb ‖ Tb` (it still expects `Ta`),
//! CPace initiator after checking `Tb` (it then sends `Ta`), SMP responder after
//! building msg4, SMP initiator after checking msg4. [`Verifier::is_finished`]
//! says that everything was received and checked and the inputs are equal.
//!
//! Any error is final: the verifier moves to a failed state, forgets its keys
//! and answers every later message with [`Error::Unexpected`]. A finished
//! verifier answers later messages with [`Error::Unexpected`] too, but stays
//! finished (a late duplicate does not undo the result).
//! [`Error::NotEqual`] is the outcome that counts toward lockout.
//!
//! **SMP responder on inequality**: the responder learns the result from msg3,
//! returns `Err(NotEqual)`, and still holds msg4 so that the initiator can learn
//! the result too; fetch it with [`Verifier::take_final_message`] and send it.
//!
//! **Lockout accounting.** The side that answers last can stop replying once it
//! knows the outcome (a CPace initiator after `Tb`, an SMP responder after
//! msg3). Callers must therefore count a run as a failed attempt as soon as it
//! starts, and clear that count only when [`Verifier::is_finished`] is true.
//!
//! # Inputs (PROTOCOL.md §3)
//!
//! Each side's input is derived from the [`Binding`] (this ZRTP session as this
//! side saw it: `sashash` and `KDF_Context = ZIDi ‖ ZIDr ‖ total_hash`) and from
//! the [`VerifySecret`] (the empty string when there is none; the run is then
//! *unbound*, see [`Verifier::is_bound`]). A relaying man in the middle causes
//! different bindings on the two legs, and without the secret he cannot make
//! either leg's test pass. `prepend_len` and `lv_cat` below are the CPace
//! draft's LEB128 length-prefix functions.
//!
//! ## CPace
//!
//! * `PRS = secret` (empty if none),
//! * `CI = lv_cat("KEAV-v1 CPace CI", KDF_Context)`,
//! * `sid = sashash` (32 bytes),
//! * `ADa = "KEAV-v1 initiator"`, `ADb = "KEAV-v1 responder"` (fixed, not sent),
//! * `g = from_uniform_bytes(SHA-512(generator_string(DSI, PRS, CI, sid, 128)))`
//!   with `DSI = "CPaceRistretto255"`, scalars sampled as 32 random bytes with
//!   the top four bits cleared (zero rejected), `Ya = ya·g`, `Yb = yb·g`,
//! * `K = ya·Yb = yb·Ya` (a received identity or non-canonical encoding aborts),
//! * `ISK = SHA-512(lv_cat("CPaceRistretto255_ISK", sid, K) ‖ transcript_ir)`
//!   with `transcript_ir = lv_cat(Ya, ADa) ‖ lv_cat(Yb, ADb)` (64 bytes),
//! * key confirmation as in the draft's §10.4:
//!   `mac_key = SHA-512("CPaceMac" ‖ sid ‖ ISK)`,
//!   `Ta = HMAC-SHA-512(mac_key, lv_cat(Ya, ADa))[0..32]`,
//!   `Tb = HMAC-SHA-512(mac_key, lv_cat(Yb, ADb))[0..32]`
//!   (the two directions differ by their messages and role labels),
//! * exported key: `key = SHA-512(lv_cat("KEAV-v1 CPace key", ISK))[0..32]`
//!   (domain-separated from `mac_key`).
//!
//! ## SMP
//!
//! * `x = SHA-512("KEAV-v1 SMP secret" ‖ prepend_len(KDF_Context) ‖ sashash ‖
//!   secret)` reduced modulo the group order (wide reduction of 64 bytes),
//! * `g1` = the ristretto255 base point; all exponents are uniformly random
//!   non-zero scalars; OTR's `g^a` is written `a·G` here,
//! * every challenge is `c = SHA-512("KEAV-v1 SMP proof" ‖ v ‖ statement ‖
//!   commitments)` reduced modulo the group order, where `v` is the one-byte
//!   proof number of OTR v3 (1 to 8) and statement/commitments are the
//!   32-byte encodings listed in the table below; the responses are
//!   `D = r − secret·c`. Unlike OTR (whose hash covers only the commitments)
//!   the statement is hashed too (strong Fiat-Shamir). The binding is *not*
//!   hashed into the proofs, so a different binding shows as `NotEqual`,
//!   never as a proof failure,
//! * Received points must decode canonically and must not be the identity;
//!   `Pa = Pb` or `Qa = Qb` is rejected as degenerate (OTR's range checks);
//!   all proofs are checked before any value is used.
//! * Equality holds iff `Pa − Pb = b3·Ra` (responder) / `= a3·Rb` (initiator),
//!   compared in constant time.
//!
//! | v | proves | statement | commitments |
//! |---|---|---|---|
//! | 1, 2 | `a2`, `a3` | `g2a` / `g3a` | `r·G` |
//! | 3, 4 | `b2`, `b3` | `g2b` / `g3b` | `r·G` |
//! | 5 | `Pb, Qb` | `g2, g3, Pb, Qb` | `r5·g3`, `r5·G + r6·g2` |
//! | 6 | `Pa, Qa` | `g2, g3, Pa, Qa` | `r5·g3`, `r5·G + r6·g2` |
//! | 7 | `Ra` | `g3a, Qa−Qb, Ra` | `r7·G`, `r7·(Qa−Qb)` |
//! | 8 | `Rb` | `g3b, Qa−Qb, Rb` | `r7·G`, `r7·(Qa−Qb)` |

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod cpace;
mod smp;
mod util;

use core::fmt;

use rand_core::{CryptoRng, RngCore};
use thiserror::Error;
use zeroize::Zeroizing;

/// Errors of the equality tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// The two inputs differ (different secret or different session): the
    /// outcome that counts toward lockout.
    #[error("verification inputs are not equal")]
    NotEqual,
    /// The message does not have the expected layout (length, scalar encoding).
    #[error("malformed verification message: {0}")]
    Malformed(&'static str),
    /// A received point is not a canonical ristretto255 encoding, is the
    /// identity, or is otherwise degenerate.
    #[error("invalid group element in verification message")]
    InvalidPoint,
    /// A zero-knowledge proof of the SMP did not verify.
    #[error("zero-knowledge proof check failed")]
    ProofFailed,
    /// A message arrived after the run finished or failed.
    #[error("unexpected verification message")]
    Unexpected,
}

/// The equality-test backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// CPace (CPACE-RISTR255-SHA512) with explicit key confirmation.
    CPace,
    /// Socialist Millionaires' Protocol on ristretto255.
    Smp,
}

impl Backend {
    /// Stable lowercase name (`cpace`, `smp`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::CPace => "cpace",
            Backend::Smp => "smp",
        }
    }

    /// The 4-byte identifier advertised in Hello.
    pub fn wire_id(self) -> [u8; 4] {
        match self {
            Backend::CPace => *b"KVCP",
            Backend::Smp => *b"KVSM",
        }
    }

    /// Parse a 4-byte identifier; `None` if it names no backend.
    pub fn from_wire_id(id: &[u8; 4]) -> Option<Backend> {
        match id {
            b"KVCP" => Some(Backend::CPace),
            b"KVSM" => Some(Backend::Smp),
            _ => None,
        }
    }
}

/// The ZRTP role of this side; the initiator sends the first verification message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The ZRTP initiator (Commit sender).
    Initiator,
    /// The ZRTP responder.
    Responder,
}

/// What ties the test to this ZRTP session, as this side saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    sashash: [u8; 32],
    kdf_context: Vec<u8>,
}

impl Binding {
    /// `sashash` from the ZRTP key schedule and
    /// `kdf_context = ZIDi ‖ ZIDr ‖ total_hash` (any length is accepted; ZRTP's
    /// is at most 512 bytes).
    pub fn new(sashash: &[u8; 32], kdf_context: &[u8]) -> Binding {
        Binding {
            sashash: *sashash,
            kdf_context: kdf_context.to_vec(),
        }
    }

    /// The session's `sashash`.
    pub fn sashash(&self) -> &[u8; 32] {
        &self.sashash
    }

    /// The session's `KDF_Context`.
    pub fn kdf_context(&self) -> &[u8] {
        &self.kdf_context
    }
}

/// A verification secret (pairing code, keyset key, ...). Zeroized on drop;
/// `Debug` prints nothing of it.
#[derive(Clone)]
pub struct VerifySecret(Zeroizing<Vec<u8>>);

impl VerifySecret {
    /// Wrap secret bytes.
    pub fn new(bytes: Vec<u8>) -> VerifySecret {
        VerifySecret(Zeroizing::new(bytes))
    }

    /// The secret bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for VerifySecret {
    fn from(s: &str) -> VerifySecret {
        VerifySecret::new(s.as_bytes().to_vec())
    }
}

impl fmt::Debug for VerifySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifySecret(..)")
    }
}

enum Inner {
    CPace(cpace::CpaceRun),
    Smp(smp::SmpRun),
}

/// One run of an equality test. See the crate documentation for the call order.
pub struct Verifier {
    inner: Inner,
    role: Role,
    bound: bool,
}

impl Verifier {
    /// Start a run. The initiator gets `Some(first message)`, the responder
    /// `None` (it waits for the initiator's message).
    pub fn start<R: RngCore + CryptoRng>(
        backend: Backend,
        role: Role,
        binding: &Binding,
        secret: Option<&VerifySecret>,
        rng: &mut R,
    ) -> Result<(Verifier, Option<Vec<u8>>), Error> {
        let secret_bytes: &[u8] = secret.map(VerifySecret::as_bytes).unwrap_or(&[]);
        let (inner, first) = match backend {
            Backend::CPace => {
                let (run, first) = cpace::CpaceRun::start(role, binding, secret_bytes, rng);
                (Inner::CPace(run), first)
            }
            Backend::Smp => {
                let (run, first) = smp::SmpRun::start(role, binding, secret_bytes, rng);
                (Inner::Smp(run), first)
            }
        };
        let verifier = Verifier {
            inner,
            role,
            bound: secret.is_some(),
        };
        Ok((verifier, first))
    }

    /// Feed the peer's next message; returns the reply to send, if any.
    pub fn receive<R: RngCore + CryptoRng>(
        &mut self,
        msg: &[u8],
        rng: &mut R,
    ) -> Result<Option<Vec<u8>>, Error> {
        match &mut self.inner {
            Inner::CPace(run) => run.receive(msg, rng),
            Inner::Smp(run) => run.receive(msg, rng),
        }
    }

    /// True once this side may send its ZRTP Confirm: it holds the result it
    /// needs, possibly still expecting the peer's final message (CPace
    /// responder waiting for `Ta`).
    pub fn ready_for_confirm(&self) -> bool {
        match &self.inner {
            Inner::CPace(run) => run.ready_for_confirm(),
            Inner::Smp(run) => run.is_finished(),
        }
    }

    /// True once this side has received and checked everything and found the
    /// inputs equal.
    pub fn is_finished(&self) -> bool {
        match &self.inner {
            Inner::CPace(run) => run.is_finished(),
            Inner::Smp(run) => run.is_finished(),
        }
    }

    /// The CPace session key (32 bytes, see the crate docs), once computed: the
    /// responder has it after the first message, before `Ta` confirms it; the
    /// initiator once `Tb` checked. `None` for SMP and after any failure.
    pub fn key(&self) -> Option<&[u8; 32]> {
        match &self.inner {
            Inner::CPace(run) => run.key(),
            Inner::Smp(_) => None,
        }
    }

    /// Whether a verification secret was supplied; `false` means the result is
    /// unbound (trust on first use: it only detects a passive relay).
    pub fn is_bound(&self) -> bool {
        self.bound
    }

    /// The backend of this run.
    pub fn backend(&self) -> Backend {
        match &self.inner {
            Inner::CPace(_) => Backend::CPace,
            Inner::Smp(_) => Backend::Smp,
        }
    }

    /// The role of this side.
    pub fn role(&self) -> Role {
        self.role
    }

    /// After the SMP responder's `receive(msg3)` returned
    /// `Err(Error::NotEqual)`: msg4, to send so that the initiator learns the
    /// result too. `None` in every other case (and on a second call).
    pub fn take_final_message(&mut self) -> Option<Vec<u8>> {
        match &mut self.inner {
            Inner::CPace(_) => None,
            Inner::Smp(run) => run.take_final_message(),
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match &self.inner {
            Inner::CPace(run) => run.phase_name(),
            Inner::Smp(run) => run.phase_name(),
        };
        f.debug_struct("Verifier")
            .field("backend", &self.backend())
            .field("role", &self.role)
            .field("bound", &self.bound)
            .field("phase", &phase)
            .finish()
    }
}
