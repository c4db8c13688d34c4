//! Encoding helpers shared by both backends.

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::IsIdentity;
use rand_core::{CryptoRng, RngCore};

use crate::Error;

/// Append the LEB128 encoding of `len` (CPace draft, A.1.1).
pub(crate) fn push_leb128(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// `prepend_len(data)`, appended to `out`.
pub(crate) fn push_prepend_len(out: &mut Vec<u8>, data: &[u8]) {
    push_leb128(out, data.len());
    out.extend_from_slice(data);
}

/// `lv_cat(parts...)`.
pub(crate) fn lv_cat(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        push_prepend_len(&mut out, p);
    }
    out
}

/// Split a message of exactly `N` 32-byte fields.
pub(crate) fn split_fields<const N: usize>(msg: &[u8]) -> Result<[[u8; 32]; N], Error> {
    if msg.len() != N * 32 {
        return Err(Error::Malformed("wrong message length"));
    }
    let mut out = [[0u8; 32]; N];
    for (field, chunk) in out.iter_mut().zip(msg.chunks_exact(32)) {
        field.copy_from_slice(chunk);
    }
    Ok(out)
}

/// Decode a canonical ristretto255 encoding that is not the identity.
pub(crate) fn decode_point(bytes: &[u8; 32]) -> Result<RistrettoPoint, Error> {
    let point = CompressedRistretto(*bytes)
        .decompress()
        .ok_or(Error::InvalidPoint)?;
    if point.is_identity() {
        return Err(Error::InvalidPoint);
    }
    Ok(point)
}

/// Decode a canonical scalar encoding.
pub(crate) fn decode_scalar(bytes: &[u8; 32]) -> Result<Scalar, Error> {
    Option::<Scalar>::from(Scalar::from_canonical_bytes(*bytes))
        .ok_or(Error::Malformed("non-canonical scalar"))
}

/// A uniformly random non-zero scalar.
pub(crate) fn random_nonzero_scalar<R: RngCore + CryptoRng>(rng: &mut R) -> Scalar {
    loop {
        let s = Scalar::random(rng);
        if s != Scalar::ZERO {
            return s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // CPace draft-21, A.1.2 and A.1.4.
    #[test]
    fn prepend_len_vectors() {
        let mut out = Vec::new();
        push_prepend_len(&mut out, b"");
        assert_eq!(hex::encode(&out), "00");
        let mut out = Vec::new();
        push_prepend_len(&mut out, b"1234");
        assert_eq!(hex::encode(&out), "0431323334");
        let data: Vec<u8> = (0u8..127).collect();
        let mut out = Vec::new();
        push_prepend_len(&mut out, &data);
        assert_eq!(out[0], 0x7f);
        assert_eq!(&out[1..], &data[..]);
        let data: Vec<u8> = (0u8..128).collect();
        let mut out = Vec::new();
        push_prepend_len(&mut out, &data);
        assert_eq!(&out[..2], &[0x80, 0x01]);
        assert_eq!(&out[2..], &data[..]);
        let mut out = Vec::new();
        push_leb128(&mut out, 300);
        assert_eq!(out, vec![0xac, 0x02]);
    }

    #[test]
    fn lv_cat_vector() {
        let out = lv_cat(&[b"1234", b"5", b"", b"678"]);
        assert_eq!(hex::encode(out), "043132333401350003363738");
    }

    #[test]
    fn split_fields_checks_length() {
        assert_eq!(
            split_fields::<2>(&[0u8; 63]),
            Err(Error::Malformed("wrong message length"))
        );
        assert!(split_fields::<2>(&[0u8; 65]).is_err());
        let mut msg = [0u8; 64];
        msg[32] = 7;
        let f = split_fields::<2>(&msg).unwrap();
        assert_eq!(f[1][0], 7);
        assert_eq!(f[0], [0u8; 32]);
    }

    #[test]
    fn decode_rejects_identity_and_noncanonical() {
        assert_eq!(decode_point(&[0u8; 32]), Err(Error::InvalidPoint));
        // p - 1 is not a canonical field element encoding (and is negative).
        let mut bad = [0xffu8; 32];
        bad[31] = 0x7f;
        assert_eq!(decode_point(&bad), Err(Error::InvalidPoint));
        let base = curve25519_dalek::constants::RISTRETTO_BASEPOINT_COMPRESSED;
        assert!(decode_point(base.as_bytes()).is_ok());
        assert_eq!(
            decode_scalar(&[0xffu8; 32]),
            Err(Error::Malformed("non-canonical scalar"))
        );
        assert_eq!(decode_scalar(&[0u8; 32]), Ok(Scalar::ZERO));
    }
}
