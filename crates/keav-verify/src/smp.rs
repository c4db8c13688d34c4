//! The Socialist Millionaires' Protocol of OTR v3 on ristretto255, with
//! SHA-512 Fiat-Shamir challenges (see the crate docs for the exact layout).

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT;
use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::util::{decode_point, decode_scalar, push_leb128, random_nonzero_scalar, split_fields};
use crate::{Binding, Error, Role};

/// Label of the secret derivation.
const SECRET_LABEL: &[u8] = b"KEAV-v1 SMP secret";
/// Label of every proof challenge.
const PROOF_LABEL: &[u8] = b"KEAV-v1 SMP proof";

/// Message sizes in 32-byte fields.
pub(crate) const MSG1_FIELDS: usize = 6;
pub(crate) const MSG2_FIELDS: usize = 11;
pub(crate) const MSG3_FIELDS: usize = 8;
pub(crate) const MSG4_FIELDS: usize = 3;

type Enc = [u8; 32];

/// `x = SHA-512("KEAV-v1 SMP secret" || prepend_len(KDF_Context) || sashash ||
/// secret) mod l`.
pub(crate) fn secret_scalar(binding: &Binding, secret: &[u8]) -> Zeroizing<Scalar> {
    let mut h = Sha512::new();
    h.update(SECRET_LABEL);
    let mut len = Vec::new();
    push_leb128(&mut len, binding.kdf_context().len());
    h.update(&len);
    h.update(binding.kdf_context());
    h.update(binding.sashash());
    h.update(secret);
    let mut wide: [u8; 64] = h.finalize().into();
    let x = Zeroizing::new(Scalar::from_bytes_mod_order_wide(&wide));
    wide.zeroize();
    x
}

/// `c = SHA-512("KEAV-v1 SMP proof" || v || items) mod l`.
pub(crate) fn challenge(v: u8, items: &[&Enc]) -> Scalar {
    let mut h = Sha512::new();
    h.update(PROOF_LABEL);
    h.update([v]);
    for item in items {
        h.update(item);
    }
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

fn enc(p: &RistrettoPoint) -> Enc {
    p.compress().to_bytes()
}

fn g1() -> RistrettoPoint {
    RISTRETTO_BASEPOINT_POINT
}

/// Schnorr proof of knowledge of `secret` with `public = secret·G`.
fn prove_dl<R: RngCore + CryptoRng>(
    v: u8,
    secret: &Scalar,
    public: &Enc,
    rng: &mut R,
) -> (Scalar, Scalar) {
    let r = Zeroizing::new(random_nonzero_scalar(rng));
    let commit = RistrettoPoint::mul_base(&r);
    let c = challenge(v, &[public, &enc(&commit)]);
    (c, *r - secret * c)
}

fn verify_dl(
    v: u8,
    public: &RistrettoPoint,
    public_enc: &Enc,
    c: &Scalar,
    d: &Scalar,
) -> Result<(), Error> {
    let commit = RistrettoPoint::vartime_double_scalar_mul_basepoint(c, public, d);
    check_challenge(c, &challenge(v, &[public_enc, &enc(&commit)]))
}

fn check_challenge(received: &Scalar, computed: &Scalar) -> Result<(), Error> {
    if bool::from(received.ct_eq(computed)) {
        Ok(())
    } else {
        Err(Error::ProofFailed)
    }
}

/// Public values of a (P, Q) proof: `P = r·g3`, `Q = r·G + x·g2`.
struct PqStatement<'a> {
    g2: &'a RistrettoPoint,
    g3: &'a RistrettoPoint,
    g2_enc: &'a Enc,
    g3_enc: &'a Enc,
    p: &'a RistrettoPoint,
    q: &'a RistrettoPoint,
    p_enc: &'a Enc,
    q_enc: &'a Enc,
}

impl PqStatement<'_> {
    fn challenge(&self, v: u8, c1: &Enc, c2: &Enc) -> Scalar {
        challenge(
            v,
            &[self.g2_enc, self.g3_enc, self.p_enc, self.q_enc, c1, c2],
        )
    }

    fn prove<R: RngCore + CryptoRng>(
        &self,
        v: u8,
        r: &Scalar,
        x: &Scalar,
        rng: &mut R,
    ) -> (Scalar, Scalar, Scalar) {
        let r5 = Zeroizing::new(random_nonzero_scalar(rng));
        let r6 = Zeroizing::new(random_nonzero_scalar(rng));
        let c1 = *r5 * self.g3;
        let c2 = RistrettoPoint::mul_base(&r5) + *r6 * self.g2;
        let c = self.challenge(v, &enc(&c1), &enc(&c2));
        (c, *r5 - r * c, *r6 - x * c)
    }

    fn verify(&self, v: u8, c: &Scalar, d5: &Scalar, d6: &Scalar) -> Result<(), Error> {
        let c1 = RistrettoPoint::vartime_multiscalar_mul([d5, c], [self.g3, self.p]);
        let c2 = RistrettoPoint::vartime_multiscalar_mul([d5, d6, c], [&g1(), self.g2, self.q]);
        check_challenge(c, &self.challenge(v, &enc(&c1), &enc(&c2)))
    }
}

/// Public values of an R proof: `g3x = a·G`, `R = a·qab`.
struct RStatement<'a> {
    g3x: &'a RistrettoPoint,
    g3x_enc: &'a Enc,
    qab: &'a RistrettoPoint,
    qab_enc: &'a Enc,
    r: &'a RistrettoPoint,
    r_enc: &'a Enc,
}

impl RStatement<'_> {
    fn challenge(&self, v: u8, c1: &Enc, c2: &Enc) -> Scalar {
        challenge(v, &[self.g3x_enc, self.qab_enc, self.r_enc, c1, c2])
    }

    fn prove<R: RngCore + CryptoRng>(&self, v: u8, a: &Scalar, rng: &mut R) -> (Scalar, Scalar) {
        let r7 = Zeroizing::new(random_nonzero_scalar(rng));
        let c1 = RistrettoPoint::mul_base(&r7);
        let c2 = *r7 * self.qab;
        let c = self.challenge(v, &enc(&c1), &enc(&c2));
        (c, *r7 - a * c)
    }

    fn verify(&self, v: u8, c: &Scalar, d7: &Scalar) -> Result<(), Error> {
        let c1 = RistrettoPoint::vartime_double_scalar_mul_basepoint(c, self.g3x, d7);
        let c2 = RistrettoPoint::vartime_multiscalar_mul([d7, c], [self.qab, self.r]);
        check_challenge(c, &self.challenge(v, &enc(&c1), &enc(&c2)))
    }
}

fn concat(fields: &[&Enc]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.len() * 32);
    for f in fields {
        out.extend_from_slice(&f[..]);
    }
    out
}

enum State {
    /// Initiator sent msg1, waits for msg2.
    InitiatorAwait2 {
        x: Zeroizing<Scalar>,
        a2: Zeroizing<Scalar>,
        a3: Zeroizing<Scalar>,
        g3a: Enc,
    },
    /// Initiator sent msg3, waits for msg4.
    InitiatorAwait4(Box<InitiatorAwait4>),
    /// Responder waits for msg1.
    ResponderAwait1 { y: Zeroizing<Scalar> },
    /// Responder sent msg2, waits for msg3.
    ResponderAwait3(Box<ResponderAwait3>),
    /// Equal, nothing more to receive.
    Done,
    /// Failed; every later message is unexpected.
    Failed,
}

struct InitiatorAwait4 {
    a3: Zeroizing<Scalar>,
    g3b: RistrettoPoint,
    g3b_enc: Enc,
    pab: Zeroizing<RistrettoPoint>,
    qab: RistrettoPoint,
    qab_enc: Enc,
}

struct ResponderAwait3 {
    b3: Zeroizing<Scalar>,
    g3a: RistrettoPoint,
    g3a_enc: Enc,
    g3b_enc: Enc,
    g2: Zeroizing<RistrettoPoint>,
    g3: Zeroizing<RistrettoPoint>,
    pb: RistrettoPoint,
    qb: RistrettoPoint,
}

/// One SMP run.
pub(crate) struct SmpRun {
    state: State,
    final_message: Option<Vec<u8>>,
}

impl SmpRun {
    pub(crate) fn start<R: RngCore + CryptoRng>(
        role: Role,
        binding: &Binding,
        secret: &[u8],
        rng: &mut R,
    ) -> (SmpRun, Option<Vec<u8>>) {
        let x = secret_scalar(binding, secret);
        match role {
            Role::Responder => (
                SmpRun {
                    state: State::ResponderAwait1 { y: x },
                    final_message: None,
                },
                None,
            ),
            Role::Initiator => {
                let a2 = Zeroizing::new(random_nonzero_scalar(rng));
                let a3 = Zeroizing::new(random_nonzero_scalar(rng));
                let g2a = enc(&RistrettoPoint::mul_base(&a2));
                let g3a = enc(&RistrettoPoint::mul_base(&a3));
                let (c2, d2) = prove_dl(1, &a2, &g2a, rng);
                let (c3, d3) = prove_dl(2, &a3, &g3a, rng);
                let msg1 = concat(&[
                    &g2a,
                    &g3a,
                    &c2.to_bytes(),
                    &d2.to_bytes(),
                    &c3.to_bytes(),
                    &d3.to_bytes(),
                ]);
                (
                    SmpRun {
                        state: State::InitiatorAwait2 { x, a2, a3, g3a },
                        final_message: None,
                    },
                    Some(msg1),
                )
            }
        }
    }

    pub(crate) fn receive<R: RngCore + CryptoRng>(
        &mut self,
        msg: &[u8],
        rng: &mut R,
    ) -> Result<Option<Vec<u8>>, Error> {
        if matches!(self.state, State::Done | State::Failed) {
            // A finished run stays finished; a failed one stays failed.
            return Err(Error::Unexpected);
        }
        let state = core::mem::replace(&mut self.state, State::Failed);
        match state {
            State::ResponderAwait1 { y } => {
                let (next, reply) = receive_msg1(&y, msg, rng)?;
                self.state = next;
                Ok(Some(reply))
            }
            State::InitiatorAwait2 { x, a2, a3, g3a } => {
                let (next, reply) = receive_msg2(&x, &a2, a3, &g3a, msg, rng)?;
                self.state = next;
                Ok(Some(reply))
            }
            State::ResponderAwait3(st) => {
                let (equal, reply) = receive_msg3(&st, msg, rng)?;
                if equal {
                    self.state = State::Done;
                    Ok(Some(reply))
                } else {
                    self.final_message = Some(reply);
                    Err(Error::NotEqual)
                }
            }
            State::InitiatorAwait4(st) => {
                let InitiatorAwait4 {
                    a3,
                    g3b,
                    g3b_enc,
                    pab,
                    qab,
                    qab_enc,
                } = *st;
                let [rb_enc, cr, d7] = split_fields::<MSG4_FIELDS>(msg)?;
                let rb = decode_point(&rb_enc)?;
                let cr = decode_scalar(&cr)?;
                let d7 = decode_scalar(&d7)?;
                RStatement {
                    g3x: &g3b,
                    g3x_enc: &g3b_enc,
                    qab: &qab,
                    qab_enc: &qab_enc,
                    r: &rb,
                    r_enc: &rb_enc,
                }
                .verify(8, &cr, &d7)?;
                let rab = Zeroizing::new(*a3 * rb);
                if bool::from(rab.ct_eq(&pab)) {
                    self.state = State::Done;
                    Ok(None)
                } else {
                    Err(Error::NotEqual)
                }
            }
            State::Done | State::Failed => Err(Error::Unexpected),
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.state, State::Done)
    }

    pub(crate) fn take_final_message(&mut self) -> Option<Vec<u8>> {
        self.final_message.take()
    }

    pub(crate) fn phase_name(&self) -> &'static str {
        match self.state {
            State::InitiatorAwait2 { .. } => "awaiting msg2",
            State::InitiatorAwait4(_) => "awaiting msg4",
            State::ResponderAwait1 { .. } => "awaiting msg1",
            State::ResponderAwait3(_) => "awaiting msg3",
            State::Done => "finished",
            State::Failed => "failed",
        }
    }
}

/// Responder: check msg1, build msg2.
fn receive_msg1<R: RngCore + CryptoRng>(
    y: &Scalar,
    msg: &[u8],
    rng: &mut R,
) -> Result<(State, Vec<u8>), Error> {
    let [g2a_enc, g3a_enc, c2, d2, c3, d3] = split_fields::<MSG1_FIELDS>(msg)?;
    let g2a = decode_point(&g2a_enc)?;
    let g3a = decode_point(&g3a_enc)?;
    let [c2, d2, c3, d3] = [c2, d2, c3, d3].map(|s| decode_scalar(&s));
    let (c2, d2, c3, d3) = (c2?, d2?, c3?, d3?);
    verify_dl(1, &g2a, &g2a_enc, &c2, &d2)?;
    verify_dl(2, &g3a, &g3a_enc, &c3, &d3)?;

    let b2 = Zeroizing::new(random_nonzero_scalar(rng));
    let b3 = Zeroizing::new(random_nonzero_scalar(rng));
    let g2b_enc = enc(&RistrettoPoint::mul_base(&b2));
    let g3b_enc = enc(&RistrettoPoint::mul_base(&b3));
    let (c2b, d2b) = prove_dl(3, &b2, &g2b_enc, rng);
    let (c3b, d3b) = prove_dl(4, &b3, &g3b_enc, rng);
    let g2 = Zeroizing::new(*b2 * g2a);
    let g3 = Zeroizing::new(*b3 * g3a);
    let (g2_enc, g3_enc) = (enc(&g2), enc(&g3));
    let r4 = Zeroizing::new(random_nonzero_scalar(rng));
    let pb = *r4 * *g3;
    let qb = RistrettoPoint::mul_base(&r4) + y * *g2;
    let (pb_enc, qb_enc) = (enc(&pb), enc(&qb));
    let (cp, d5, d6) = PqStatement {
        g2: &g2,
        g3: &g3,
        g2_enc: &g2_enc,
        g3_enc: &g3_enc,
        p: &pb,
        q: &qb,
        p_enc: &pb_enc,
        q_enc: &qb_enc,
    }
    .prove(5, &r4, y, rng);
    let msg2 = concat(&[
        &g2b_enc,
        &g3b_enc,
        &pb_enc,
        &qb_enc,
        &c2b.to_bytes(),
        &d2b.to_bytes(),
        &c3b.to_bytes(),
        &d3b.to_bytes(),
        &cp.to_bytes(),
        &d5.to_bytes(),
        &d6.to_bytes(),
    ]);
    let next = State::ResponderAwait3(Box::new(ResponderAwait3 {
        b3,
        g3a,
        g3a_enc,
        g3b_enc,
        g2,
        g3,
        pb,
        qb,
    }));
    Ok((next, msg2))
}

/// Initiator: check msg2, build msg3.
fn receive_msg2<R: RngCore + CryptoRng>(
    x: &Scalar,
    a2: &Scalar,
    a3: Zeroizing<Scalar>,
    g3a_enc: &Enc,
    msg: &[u8],
    rng: &mut R,
) -> Result<(State, Vec<u8>), Error> {
    let [g2b_enc, g3b_enc, pb_enc, qb_enc, c2, d2, c3, d3, cp, d5, d6] =
        split_fields::<MSG2_FIELDS>(msg)?;
    let g2b = decode_point(&g2b_enc)?;
    let g3b = decode_point(&g3b_enc)?;
    let pb = decode_point(&pb_enc)?;
    let qb = decode_point(&qb_enc)?;
    let [c2, d2, c3, d3, cp, d5, d6] = [c2, d2, c3, d3, cp, d5, d6].map(|s| decode_scalar(&s));
    let (c2, d2, c3, d3, cp, d5, d6) = (c2?, d2?, c3?, d3?, cp?, d5?, d6?);
    verify_dl(3, &g2b, &g2b_enc, &c2, &d2)?;
    verify_dl(4, &g3b, &g3b_enc, &c3, &d3)?;
    let g2 = Zeroizing::new(a2 * g2b);
    let g3 = Zeroizing::new(*a3 * g3b);
    let (g2_enc, g3_enc) = (enc(&g2), enc(&g3));
    PqStatement {
        g2: &g2,
        g3: &g3,
        g2_enc: &g2_enc,
        g3_enc: &g3_enc,
        p: &pb,
        q: &qb,
        p_enc: &pb_enc,
        q_enc: &qb_enc,
    }
    .verify(5, &cp, &d5, &d6)?;

    let r4 = Zeroizing::new(random_nonzero_scalar(rng));
    let pa = *r4 * *g3;
    let qa = RistrettoPoint::mul_base(&r4) + x * *g2;
    let (pa_enc, qa_enc) = (enc(&pa), enc(&qa));
    let (cpa, d5a, d6a) = PqStatement {
        g2: &g2,
        g3: &g3,
        g2_enc: &g2_enc,
        g3_enc: &g3_enc,
        p: &pa,
        q: &qa,
        p_enc: &pa_enc,
        q_enc: &qa_enc,
    }
    .prove(6, &r4, x, rng);
    let qab = qa - qb;
    let qab_enc = enc(&qab);
    let ra = *a3 * qab;
    let ra_enc = enc(&ra);
    let g3a = RistrettoPoint::mul_base(&a3);
    let (cr, d7) = RStatement {
        g3x: &g3a,
        g3x_enc: g3a_enc,
        qab: &qab,
        qab_enc: &qab_enc,
        r: &ra,
        r_enc: &ra_enc,
    }
    .prove(7, &a3, rng);
    let msg3 = concat(&[
        &pa_enc,
        &qa_enc,
        &ra_enc,
        &cpa.to_bytes(),
        &d5a.to_bytes(),
        &d6a.to_bytes(),
        &cr.to_bytes(),
        &d7.to_bytes(),
    ]);
    let next = State::InitiatorAwait4(Box::new(InitiatorAwait4 {
        a3,
        g3b,
        g3b_enc,
        pab: Zeroizing::new(pa - pb),
        qab,
        qab_enc,
    }));
    Ok((next, msg3))
}

/// Responder: check msg3, build msg4; returns whether the inputs are equal.
fn receive_msg3<R: RngCore + CryptoRng>(
    st: &ResponderAwait3,
    msg: &[u8],
    rng: &mut R,
) -> Result<(bool, Vec<u8>), Error> {
    let [pa_enc, qa_enc, ra_enc, cp, d5, d6, cr, d7] = split_fields::<MSG3_FIELDS>(msg)?;
    let pa = decode_point(&pa_enc)?;
    let qa = decode_point(&qa_enc)?;
    let ra = decode_point(&ra_enc)?;
    let [cp, d5, d6, cr, d7] = [cp, d5, d6, cr, d7].map(|s| decode_scalar(&s));
    let (cp, d5, d6, cr, d7) = (cp?, d5?, d6?, cr?, d7?);
    let pab = Zeroizing::new(pa - st.pb);
    let qab = qa - st.qb;
    if pab.is_identity() || qab.is_identity() {
        return Err(Error::InvalidPoint);
    }
    let (g2_enc, g3_enc) = (enc(&st.g2), enc(&st.g3));
    PqStatement {
        g2: &st.g2,
        g3: &st.g3,
        g2_enc: &g2_enc,
        g3_enc: &g3_enc,
        p: &pa,
        q: &qa,
        p_enc: &pa_enc,
        q_enc: &qa_enc,
    }
    .verify(6, &cp, &d5, &d6)?;
    let qab_enc = enc(&qab);
    RStatement {
        g3x: &st.g3a,
        g3x_enc: &st.g3a_enc,
        qab: &qab,
        qab_enc: &qab_enc,
        r: &ra,
        r_enc: &ra_enc,
    }
    .verify(7, &cr, &d7)?;

    let rb = *st.b3 * qab;
    let rb_enc = enc(&rb);
    let g3b = RistrettoPoint::mul_base(&st.b3);
    let (crb, d7b) = RStatement {
        g3x: &g3b,
        g3x_enc: &st.g3b_enc,
        qab: &qab,
        qab_enc: &qab_enc,
        r: &rb,
        r_enc: &rb_enc,
    }
    .prove(8, &st.b3, rng);
    let msg4 = concat(&[&rb_enc, &crb.to_bytes(), &d7b.to_bytes()]);
    let rab = Zeroizing::new(*st.b3 * ra);
    let equal = bool::from(rab.ct_eq(&pab));
    Ok((equal, msg4))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented derivation of x, recomputed by hand.
    #[test]
    fn secret_scalar_matches_documentation() {
        let ctx = vec![0xabu8; 200]; // LEB128(200) = c8 01
        let binding = Binding::new(&[0x33u8; 32], &ctx);
        let mut input = b"KEAV-v1 SMP secret".to_vec();
        input.extend_from_slice(&[0xc8, 0x01]);
        input.extend_from_slice(&ctx);
        input.extend_from_slice(&[0x33u8; 32]);
        input.extend_from_slice(b"pairing code");
        let wide: [u8; 64] = Sha512::digest(&input).into();
        let expected = Scalar::from_bytes_mod_order_wide(&wide);
        assert_eq!(*secret_scalar(&binding, b"pairing code"), expected);
        assert_ne!(*secret_scalar(&binding, b"pairing cod"), expected);
        // The length prefix separates KDF_Context from sashash.
        let moved = Binding::new(&[0x33u8; 32], &ctx[..199]);
        assert_ne!(*secret_scalar(&moved, b"pairing code"), expected);
    }

    #[test]
    fn challenge_matches_documentation() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let mut input = b"KEAV-v1 SMP proof".to_vec();
        input.push(5);
        input.extend_from_slice(&a);
        input.extend_from_slice(&b);
        let wide: [u8; 64] = Sha512::digest(&input).into();
        assert_eq!(
            challenge(5, &[&a, &b]),
            Scalar::from_bytes_mod_order_wide(&wide)
        );
        assert_ne!(challenge(6, &[&a, &b]), challenge(5, &[&a, &b]));
    }

    /// The equality condition of the protocol: with honest values,
    /// Pa - Pb = a3·b3·(Qa - Qb) iff x = y.
    #[test]
    fn equality_condition() {
        let mut rng = rand::thread_rng();
        let s = || random_nonzero_scalar(&mut rand::thread_rng());
        let (a2, a3, b2, b3, r, s2) = (s(), s(), s(), s(), s(), s());
        let g2 = RistrettoPoint::mul_base(&(a2 * b2));
        let g3 = RistrettoPoint::mul_base(&(a3 * b3));
        let x = random_nonzero_scalar(&mut rng);
        for y in [x, x + Scalar::ONE] {
            let (pa, qa) = (s2 * g3, RistrettoPoint::mul_base(&s2) + x * g2);
            let (pb, qb) = (r * g3, RistrettoPoint::mul_base(&r) + y * g2);
            let rab = a3 * b3 * (qa - qb);
            assert_eq!(rab == pa - pb, x == y);
        }
    }
}
