//! CPace (draft-irtf-cfrg-cpace-21), cipher suite CPACE-RISTR255-SHA512, in the
//! initiator-responder setting, with the key confirmation of the draft's §10.4.

use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::util::{decode_point, lv_cat, push_leb128, push_prepend_len, split_fields};
use crate::{Binding, Error, Role};

/// `G_Ristretto255.DSI`.
pub(crate) const DSI: &[u8] = b"CPaceRistretto255";
/// `DSI || "_ISK"`.
const DSI_ISK: &[u8] = b"CPaceRistretto255_ISK";
/// SHA-512 input block size.
const S_IN_BYTES: usize = 128;
/// KEAV label of the channel identifier.
const CI_LABEL: &[u8] = b"KEAV-v1 CPace CI";
/// Initiator's associated data (fixed, not transmitted).
pub(crate) const AD_INITIATOR: &[u8] = b"KEAV-v1 initiator";
/// Responder's associated data (fixed, not transmitted).
pub(crate) const AD_RESPONDER: &[u8] = b"KEAV-v1 responder";
/// KEAV label of the exported key.
const KEY_LABEL: &[u8] = b"KEAV-v1 CPace key";
/// Length of a key-confirmation tag on the wire.
const TAG_LEN: usize = 32;

type HmacSha512 = Hmac<Sha512>;

/// `generator_string(DSI, PRS, CI, sid, s_in_bytes)` (draft A.2).
pub(crate) fn generator_string(
    dsi: &[u8],
    prs: &[u8],
    ci: &[u8],
    sid: &[u8],
    s_in_bytes: usize,
) -> Zeroizing<Vec<u8>> {
    let mut len_prs = Vec::new();
    push_leb128(&mut len_prs, prs.len());
    let mut len_dsi = Vec::new();
    push_leb128(&mut len_dsi, dsi.len());
    let used = 1 + len_prs.len() + prs.len() + len_dsi.len() + dsi.len();
    let len_zpad = s_in_bytes.saturating_sub(used);
    let zpad = vec![0u8; len_zpad];
    let mut out = Zeroizing::new(Vec::with_capacity(
        used + len_zpad + ci.len() + sid.len() + 8,
    ));
    push_prepend_len(&mut out, dsi);
    push_prepend_len(&mut out, prs);
    push_prepend_len(&mut out, &zpad);
    push_prepend_len(&mut out, ci);
    push_prepend_len(&mut out, sid);
    out
}

/// `G.calculate_generator(H, PRS, CI, sid)` (draft §8.3).
pub(crate) fn calculate_generator(prs: &[u8], ci: &[u8], sid: &[u8]) -> RistrettoPoint {
    let gen_str = generator_string(DSI, prs, ci, sid, S_IN_BYTES);
    let mut hash: [u8; 64] = Sha512::digest(gen_str.as_slice()).into();
    let g = RistrettoPoint::from_uniform_bytes(&hash);
    hash.zeroize();
    g
}

/// `G.sample_scalar()`: 32 random bytes, bits above 252 cleared; zero rejected.
pub(crate) fn sample_scalar<R: RngCore + CryptoRng>(rng: &mut R) -> Scalar {
    loop {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        bytes[31] &= 0x0f;
        let s = Scalar::from_bytes_mod_order(*bytes);
        if s != Scalar::ZERO {
            return s;
        }
    }
}

/// `G.scalar_mult_vfy(y, X)`: `None` stands for `G.I` (undecodable input or
/// neutral result).
pub(crate) fn scalar_mult_vfy(y: &Scalar, x: &[u8; 32]) -> Option<[u8; 32]> {
    let point = decode_point(x).ok()?;
    let k = y * point;
    let enc = k.compress().to_bytes();
    if enc == [0u8; 32] {
        None
    } else {
        Some(enc)
    }
}

/// `transcript_ir(Ya, ADa, Yb, ADb)`.
pub(crate) fn transcript_ir(ya: &[u8], ada: &[u8], yb: &[u8], adb: &[u8]) -> Vec<u8> {
    let mut out = lv_cat(&[ya, ada]);
    out.extend_from_slice(&lv_cat(&[yb, adb]));
    out
}

/// `ISK = H.hash(lv_cat(DSI || "_ISK", sid, K) || transcript_ir(...))`.
pub(crate) fn isk(
    sid: &[u8],
    k: &[u8; 32],
    ya: &[u8],
    ada: &[u8],
    yb: &[u8],
    adb: &[u8],
) -> Zeroizing<[u8; 64]> {
    let mut h = Sha512::new();
    let prefix = Zeroizing::new(lv_cat(&[DSI_ISK, sid, k]));
    h.update(prefix.as_slice());
    h.update(transcript_ir(ya, ada, yb, adb));
    Zeroizing::new(h.finalize().into())
}

/// Key-confirmation tags and the exported key, all derived from ISK.
struct Confirmation {
    ta: Zeroizing<[u8; TAG_LEN]>,
    tb: Zeroizing<[u8; TAG_LEN]>,
    key: Zeroizing<[u8; 32]>,
}

fn tag(mac_key: &[u8], y: &[u8], ad: &[u8]) -> Zeroizing<[u8; TAG_LEN]> {
    let mut out = Zeroizing::new([0u8; TAG_LEN]);
    // HMAC accepts keys of any length, so this cannot fail.
    if let Ok(mut mac) = HmacSha512::new_from_slice(mac_key) {
        mac.update(&lv_cat(&[y, ad]));
        let full = Zeroizing::new(<[u8; 64]>::from(mac.finalize().into_bytes()));
        out.copy_from_slice(&full[..TAG_LEN]);
    }
    out
}

fn confirmation(sid: &[u8], isk: &[u8; 64], ya: &[u8], yb: &[u8]) -> Confirmation {
    let mut h = Sha512::new();
    h.update(b"CPaceMac");
    h.update(sid);
    h.update(isk);
    let mac_key = Zeroizing::new(<[u8; 64]>::from(h.finalize()));
    let ta = tag(mac_key.as_slice(), ya, AD_INITIATOR);
    let tb = tag(mac_key.as_slice(), yb, AD_RESPONDER);
    let mut kh = Sha512::new();
    kh.update(lv_cat(&[KEY_LABEL, isk]));
    let full = Zeroizing::new(<[u8; 64]>::from(kh.finalize()));
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&full[..32]);
    Confirmation { ta, tb, key }
}

/// The channel identifier `CI = lv_cat("KEAV-v1 CPace CI", KDF_Context)`.
pub(crate) fn channel_identifier(binding: &Binding) -> Vec<u8> {
    lv_cat(&[CI_LABEL, binding.kdf_context()])
}

enum State {
    /// Initiator sent `Ya`, waits for `Yb || Tb`.
    InitiatorSentYa {
        ya: Zeroizing<Scalar>,
        ya_enc: [u8; 32],
    },
    /// Responder computed `Yb`, waits for `Ya`.
    ResponderAwaitYa {
        yb: Zeroizing<Scalar>,
        yb_enc: [u8; 32],
    },
    /// Responder sent `Yb || Tb`, waits for `Ta`.
    ResponderAwaitTa {
        expected_ta: Zeroizing<[u8; TAG_LEN]>,
        key: Zeroizing<[u8; 32]>,
    },
    /// Confirmed on this side.
    Done { key: Zeroizing<[u8; 32]> },
    /// Failed; every later message is unexpected.
    Failed,
}

/// One CPace run.
pub(crate) struct CpaceRun {
    sid: [u8; 32],
    state: State,
}

impl CpaceRun {
    pub(crate) fn start<R: RngCore + CryptoRng>(
        role: Role,
        binding: &Binding,
        prs: &[u8],
        rng: &mut R,
    ) -> (CpaceRun, Option<Vec<u8>>) {
        let ci = channel_identifier(binding);
        let sid = *binding.sashash();
        let g = Zeroizing::new(calculate_generator(prs, &ci, &sid));
        let y = Zeroizing::new(sample_scalar(rng));
        let y_enc = (*y * *g).compress().to_bytes();
        match role {
            Role::Initiator => (
                CpaceRun {
                    sid,
                    state: State::InitiatorSentYa {
                        ya: y,
                        ya_enc: y_enc,
                    },
                },
                Some(y_enc.to_vec()),
            ),
            Role::Responder => (
                CpaceRun {
                    sid,
                    state: State::ResponderAwaitYa {
                        yb: y,
                        yb_enc: y_enc,
                    },
                },
                None,
            ),
        }
    }

    pub(crate) fn receive<R: RngCore + CryptoRng>(
        &mut self,
        msg: &[u8],
        _rng: &mut R,
    ) -> Result<Option<Vec<u8>>, Error> {
        if matches!(self.state, State::Done { .. } | State::Failed) {
            // A finished run stays finished (and keeps its key); a failed one
            // stays failed.
            return Err(Error::Unexpected);
        }
        let state = core::mem::replace(&mut self.state, State::Failed);
        let (next, reply) = self.step(state, msg)?;
        self.state = next;
        Ok(reply)
    }

    fn step(&self, state: State, msg: &[u8]) -> Result<(State, Option<Vec<u8>>), Error> {
        match state {
            State::ResponderAwaitYa { yb, yb_enc } => {
                let [ya_enc] = split_fields::<1>(msg)?;
                let k = Zeroizing::new(scalar_mult_vfy(&yb, &ya_enc).ok_or(Error::InvalidPoint)?);
                let isk = isk(&self.sid, &k, &ya_enc, AD_INITIATOR, &yb_enc, AD_RESPONDER);
                let conf = confirmation(&self.sid, &isk, &ya_enc, &yb_enc);
                let mut reply = Vec::with_capacity(64);
                reply.extend_from_slice(&yb_enc);
                reply.extend_from_slice(conf.tb.as_slice());
                Ok((
                    State::ResponderAwaitTa {
                        expected_ta: conf.ta,
                        key: conf.key,
                    },
                    Some(reply),
                ))
            }
            State::InitiatorSentYa { ya, ya_enc } => {
                let [yb_enc, tb] = split_fields::<2>(msg)?;
                let k = Zeroizing::new(scalar_mult_vfy(&ya, &yb_enc).ok_or(Error::InvalidPoint)?);
                let isk = isk(&self.sid, &k, &ya_enc, AD_INITIATOR, &yb_enc, AD_RESPONDER);
                let conf = confirmation(&self.sid, &isk, &ya_enc, &yb_enc);
                if !bool::from(conf.tb.ct_eq(&tb)) {
                    return Err(Error::NotEqual);
                }
                Ok((State::Done { key: conf.key }, Some(conf.ta.to_vec())))
            }
            State::ResponderAwaitTa { expected_ta, key } => {
                let [ta] = split_fields::<1>(msg)?;
                if !bool::from(expected_ta.ct_eq(&ta)) {
                    return Err(Error::NotEqual);
                }
                Ok((State::Done { key }, None))
            }
            State::Done { .. } | State::Failed => Err(Error::Unexpected),
        }
    }

    pub(crate) fn ready_for_confirm(&self) -> bool {
        matches!(
            self.state,
            State::ResponderAwaitTa { .. } | State::Done { .. }
        )
    }

    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    pub(crate) fn key(&self) -> Option<&[u8; 32]> {
        match &self.state {
            State::ResponderAwaitTa { key, .. } | State::Done { key } => Some(key),
            _ => None,
        }
    }

    pub(crate) fn phase_name(&self) -> &'static str {
        match self.state {
            State::InitiatorSentYa { .. } => "awaiting Yb||Tb",
            State::ResponderAwaitYa { .. } => "awaiting Ya",
            State::ResponderAwaitTa { .. } => "awaiting Ta",
            State::Done { .. } => "finished",
            State::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    //! Test vectors of draft-irtf-cfrg-cpace-21, appendix B.3 (ristretto255,
    //! SHA-512), and the transcript vectors of A.3.5.
    use super::*;
    use curve25519_dalek::ristretto::CompressedRistretto;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }
    fn h32(s: &str) -> [u8; 32] {
        h(s).try_into().unwrap()
    }

    const PRS: &[u8] = b"Password";
    const CI_HEX: &str = "0b415f696e69746961746f720b425f726573706f6e646572";
    const SID_HEX: &str = "7e4b4791d6a8ef019b936c79fb7f2c57";
    const YA_SCALAR: &str = "da3d23700a9e5699258aef94dc060dfda5ebb61f02a5ea77fad53f4ff0976d08";
    const YB_SCALAR: &str = "d2316b454718c35362d83d69df6320f38578ed5984651435e2949762d900b80d";
    const YA: &str = "d6bac480f2c386c394efc7c47adb9925dcd2630b64f240c50f8d0eec482b9157";
    const YB: &str = "3ea7e0b19560d7c0b0f5734f63b955286dfa8232b5ebe63324e2d9e7433f7258";
    const K: &str = "80b69a8a76457ab6a4d7f887a4bf6b55a2f80ac19c333f917a05fc9887c8b40f";

    fn scalar(s: &str) -> Scalar {
        // The draft's scalars are below 2^252, hence canonical.
        Option::<Scalar>::from(Scalar::from_canonical_bytes(h32(s))).unwrap()
    }

    #[test]
    fn generator_string_and_generator() {
        let ci = h(CI_HEX);
        let sid = h(SID_HEX);
        let gs = generator_string(DSI, PRS, &ci, &sid, S_IN_BYTES);
        let expected = h("11435061636552697374726574746f3235350850617373776f726464
             00000000000000000000000000000000000000000000000000000000
             00000000000000000000000000000000000000000000000000000000
             00000000000000000000000000000000000000000000000000000000
             00000000000000000000000000000000180b415f696e69746961746f
             720b425f726573706f6e646572107e4b4791d6a8ef019b936c79fb7f
             2c57");
        assert_eq!(gs.len(), 170);
        assert_eq!(gs.as_slice(), &expected[..]);
        let hash = Sha512::digest(gs.as_slice());
        assert_eq!(
            hash.as_slice(),
            &h("da6d3ddc8802fca9058755ffd3ebde08a9c2c74945901a258482a288
                b6663af06bf645c93cd1c51512307199c80e84908916d983b34af772
                05f90851a657ee27")[..]
        );
        let g = calculate_generator(PRS, &ci, &sid);
        assert_eq!(
            g.compress().to_bytes(),
            h32("222b6b195fe84b1652badb6f6a3ae3d24341e7306967f0b8115b40d5698c7e56")
        );
    }

    #[test]
    fn messages_secret_point_and_isk() {
        let ci = h(CI_HEX);
        let sid = h(SID_HEX);
        let g = calculate_generator(PRS, &ci, &sid);
        let ya = scalar(YA_SCALAR);
        let yb = scalar(YB_SCALAR);
        let ya_enc = (ya * g).compress().to_bytes();
        let yb_enc = (yb * g).compress().to_bytes();
        assert_eq!(ya_enc, h32(YA));
        assert_eq!(yb_enc, h32(YB));
        let ka = scalar_mult_vfy(&ya, &yb_enc).unwrap();
        let kb = scalar_mult_vfy(&yb, &ya_enc).unwrap();
        assert_eq!(ka, h32(K));
        assert_eq!(kb, h32(K));
        let tr = transcript_ir(&ya_enc, b"ADa", &yb_enc, b"ADb");
        assert_eq!(
            tr,
            h("20d6bac480f2c386c394efc7c47adb9925dcd2630b64f240c50f8d0e
               ec482b915703414461203ea7e0b19560d7c0b0f5734f63b955286dfa
               8232b5ebe63324e2d9e7433f725803414462")
        );
        let isk = isk(&sid, &ka, &ya_enc, b"ADa", &yb_enc, b"ADb");
        assert_eq!(
            &isk[..],
            &h("b69effbf61b51d56401c0f65601abe428de8206feaaf0e32198896dc
                ae7b35cd2b38950a39dfd5d4a79164614c2984f7daa460b588c1e80c
                3fa2068af7900447")[..]
        );
    }

    #[test]
    fn transcript_ir_vectors() {
        assert_eq!(
            hex::encode(transcript_ir(b"123", b"PartyA", b"234", b"PartyB")),
            "03313233065061727479410332333406506172747942"
        );
        assert_eq!(
            hex::encode(transcript_ir(b"3456", b"PartyA", b"2345", b"PartyB")),
            "043334353606506172747941043233343506506172747942"
        );
    }

    #[test]
    fn scalar_mult_valid_and_invalid() {
        let s = scalar("7cd0e075fa7955ba52c02759a6c90dbbfc10e6d40aea8d283e407d88cf538a05");
        let x = h32("2c3c6b8c4f3800e7aef6864025b4ed79bd599117e427c41bd47d93d654b4a51c");
        let expected = h32("7c13645fe790a468f62c39beb7388e541d8405d1ade69d1778c5fe3e7f6b600e");
        let decoded = CompressedRistretto(x).decompress().unwrap();
        assert_eq!((s * decoded).compress().to_bytes(), expected);
        assert_eq!(scalar_mult_vfy(&s, &x), Some(expected));
        let y_i1 = h32("2b3c6b8c4f3800e7aef6864025b4ed79bd599117e427c41bd47d93d654b4a51c");
        assert_eq!(scalar_mult_vfy(&s, &y_i1), None);
        assert_eq!(scalar_mult_vfy(&s, &[0u8; 32]), None);
    }

    #[test]
    fn invalid_points_abort_the_protocol() {
        // A responder receiving Y_i1 or G.I as Ya, and an initiator receiving
        // them as Yb, must abort with InvalidPoint.
        let binding = Binding::new(&[7u8; 32], b"ctx");
        let mut rng = rand::thread_rng();
        let y_i1 = h32("2b3c6b8c4f3800e7aef6864025b4ed79bd599117e427c41bd47d93d654b4a51c");
        for bad in [y_i1, [0u8; 32]] {
            let (mut r, _) = CpaceRun::start(Role::Responder, &binding, b"pw", &mut rng);
            assert_eq!(r.receive(&bad, &mut rng), Err(Error::InvalidPoint));
            assert!(r.key().is_none());
            let (mut i, _) = CpaceRun::start(Role::Initiator, &binding, b"pw", &mut rng);
            let mut msg = bad.to_vec();
            msg.extend_from_slice(&[0u8; 32]);
            assert_eq!(i.receive(&msg, &mut rng), Err(Error::InvalidPoint));
        }
    }

    #[test]
    fn sample_scalar_clears_top_bits() {
        struct Ones;
        impl RngCore for Ones {
            fn next_u32(&mut self) -> u32 {
                u32::MAX
            }
            fn next_u64(&mut self) -> u64 {
                u64::MAX
            }
            fn fill_bytes(&mut self, dest: &mut [u8]) {
                dest.fill(0xff);
            }
            fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
                dest.fill(0xff);
                Ok(())
            }
        }
        impl CryptoRng for Ones {}
        let s = sample_scalar(&mut Ones);
        let mut expected = [0xffu8; 32];
        expected[31] = 0x0f;
        assert_eq!(s.to_bytes(), expected);
    }

    /// An rng replaying fixed bytes (to pin the scalars).
    struct FixedRng(Vec<u8>);
    impl RngCore for FixedRng {
        fn next_u32(&mut self) -> u32 {
            unimplemented!()
        }
        fn next_u64(&mut self) -> u64 {
            unimplemented!()
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            let rest = self.0.split_off(dest.len());
            dest.copy_from_slice(&self.0);
            self.0 = rest;
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl CryptoRng for FixedRng {}

    /// The whole run, recomputed independently from the documented KEAV
    /// derivations (CI, AD labels, sid, tags, exported key).
    #[test]
    fn run_matches_documented_derivation() {
        let sashash = [0x42u8; 32];
        let ctx = b"ZIDi-ZIDr-total_hash";
        let binding = Binding::new(&sashash, ctx);
        let (mut i, ya_msg) = CpaceRun::start(
            Role::Initiator,
            &binding,
            b"1234",
            &mut FixedRng(h(YA_SCALAR)),
        );
        let (mut r, none) = CpaceRun::start(
            Role::Responder,
            &binding,
            b"1234",
            &mut FixedRng(h(YB_SCALAR)),
        );
        assert!(none.is_none());
        let ya_msg = ya_msg.unwrap();
        let m2 = r.receive(&ya_msg, &mut FixedRng(vec![])).unwrap().unwrap();
        let m3 = i.receive(&m2, &mut FixedRng(vec![])).unwrap().unwrap();
        assert_eq!(r.receive(&m3, &mut FixedRng(vec![])), Ok(None));

        // Independent recomputation.
        let mut ci = vec![16u8];
        ci.extend_from_slice(b"KEAV-v1 CPace CI");
        ci.push(20);
        ci.extend_from_slice(ctx);
        let g = calculate_generator(b"1234", &ci, &sashash);
        let ya = (scalar(YA_SCALAR) * g).compress().to_bytes();
        let yb = (scalar(YB_SCALAR) * g).compress().to_bytes();
        assert_eq!(ya_msg, ya.to_vec());
        assert_eq!(&m2[..32], &yb[..]);
        let k = (scalar(YA_SCALAR) * scalar(YB_SCALAR) * g)
            .compress()
            .to_bytes();
        let mut isk_in = vec![21u8];
        isk_in.extend_from_slice(b"CPaceRistretto255_ISK");
        isk_in.push(32);
        isk_in.extend_from_slice(&sashash);
        isk_in.push(32);
        isk_in.extend_from_slice(&k);
        isk_in.push(32);
        isk_in.extend_from_slice(&ya);
        isk_in.push(17);
        isk_in.extend_from_slice(b"KEAV-v1 initiator");
        isk_in.push(32);
        isk_in.extend_from_slice(&yb);
        isk_in.push(17);
        isk_in.extend_from_slice(b"KEAV-v1 responder");
        let isk = Sha512::digest(&isk_in);
        let mut mk = b"CPaceMac".to_vec();
        mk.extend_from_slice(&sashash);
        mk.extend_from_slice(&isk);
        let mac_key = Sha512::digest(&mk);
        let tag_of = |y: &[u8; 32], ad: &[u8]| {
            let mut mac = HmacSha512::new_from_slice(&mac_key).unwrap();
            let mut m = vec![32u8];
            m.extend_from_slice(y);
            m.push(ad.len() as u8);
            m.extend_from_slice(ad);
            mac.update(&m);
            mac.finalize().into_bytes()[..32].to_vec()
        };
        assert_eq!(m2[32..].to_vec(), tag_of(&yb, b"KEAV-v1 responder"));
        assert_eq!(m3, tag_of(&ya, b"KEAV-v1 initiator"));
        let mut kin = vec![17u8];
        kin.extend_from_slice(b"KEAV-v1 CPace key");
        kin.push(64);
        kin.extend_from_slice(&isk);
        let key = Sha512::digest(&kin);
        assert_eq!(i.key().unwrap()[..], key[..32]);
        assert_eq!(r.key().unwrap()[..], key[..32]);
    }
}
