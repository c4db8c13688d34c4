//! The C2 wire module's view of `keav_proto::codec::Reader`, the one bounds-checked cursor
//! over untrusted bytes in keav.
//!
//! Every accessor checks the remaining length first and fails with [`WireError::Truncated`]
//! when the input is too short, leaving the reader where it was. [`Reader::sub`] confines a
//! length-prefixed field to the bytes its length announced, so a bad inner length can never
//! read past its enclosing field. Integers are big-endian (network byte order). This wrapper
//! only maps `keav-proto`'s [`ParseError`] to keav-c2's typed [`WireError`]; the cursor
//! logic lives in `keav-proto`.

use keav_proto::codec;
use keav_proto::error::ParseError;

use super::WireError;

/// `keav-proto`'s parse errors as wire errors: a short read is [`WireError::Truncated`],
/// unconsumed bytes are [`WireError::TrailingBytes`].
fn wire(e: ParseError) -> WireError {
    match e {
        ParseError::Truncated => WireError::Truncated,
        ParseError::TooLong => WireError::TrailingBytes,
        // The reader produces no other error; anything else is a malformed encoding.
        _ => WireError::BadField("encoding"),
    }
}

/// A cursor over a borrowed byte slice with checked reads.
#[derive(Debug, Clone)]
pub struct Reader<'a>(codec::Reader<'a>);

impl<'a> Reader<'a> {
    /// A reader positioned at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader(codec::Reader::new(buf))
    }

    /// Takes the next `n` bytes, or [`WireError::Truncated`] if fewer remain.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.0.take(n).map_err(wire)
    }

    /// Reads exactly `N` bytes into an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.0.array().map_err(wire)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        self.0.u8().map_err(wire)
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.0.u16().map_err(wire)
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.0.u32().map_err(wire)
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.0.u64().map_err(wire)
    }

    /// Reads a one-byte length, then that many bytes.
    pub fn vec8(&mut self) -> Result<&'a [u8], WireError> {
        self.0.vec8().map_err(wire)
    }

    /// Reads a two-byte length, then that many bytes.
    pub fn vec16(&mut self) -> Result<&'a [u8], WireError> {
        self.0.vec16().map_err(wire)
    }

    /// Splits off a reader over the next `n` bytes and advances past them.
    pub fn sub(&mut self, n: usize) -> Result<Reader<'a>, WireError> {
        self.0.sub(n).map(Reader).map_err(wire)
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.0.remaining()
    }

    /// How many bytes were consumed so far.
    pub fn position(&self) -> usize {
        self.0.position()
    }

    /// [`WireError::TrailingBytes`] unless every byte was consumed.
    pub fn expect_end(&self) -> Result<(), WireError> {
        self.0.expect_end().map_err(wire)
    }
}

/// Appends a one-byte length and `bytes`, or [`WireError::BadField`] naming `field` if
/// `bytes` is longer than `max` (at most 255).
pub(crate) fn put_vec8(
    out: &mut Vec<u8>,
    bytes: &[u8],
    max: usize,
    field: &'static str,
) -> Result<(), WireError> {
    let n = u8::try_from(bytes.len()).map_err(|_| WireError::BadField(field))?;
    if bytes.len() > max {
        return Err(WireError::BadField(field));
    }
    out.push(n);
    out.extend_from_slice(bytes);
    Ok(())
}

/// Appends a two-byte length and `bytes`, or [`WireError::BadField`] naming `field` if
/// `bytes` is longer than `max` (at most 65535).
pub(crate) fn put_vec16(
    out: &mut Vec<u8>,
    bytes: &[u8],
    max: usize,
    field: &'static str,
) -> Result<(), WireError> {
    let n = u16::try_from(bytes.len()).map_err(|_| WireError::BadField(field))?;
    if bytes.len() > max {
        return Err(WireError::BadField(field));
    }
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_map_to_wire_errors() {
        assert_eq!(wire(ParseError::Truncated), WireError::Truncated);
        assert_eq!(wire(ParseError::TooLong), WireError::TrailingBytes);
        assert_eq!(wire(ParseError::BadCrc), WireError::BadField("encoding"));
    }

    #[test]
    fn reads_big_endian_and_refuses_short_reads() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        let mut r = Reader::new(&b);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.u32(), Ok(0x0405_0607));
        assert_eq!(r.u64(), Ok(0x0809_0a0b_0c0d_0e0f));
        assert_eq!(r.position(), 15);
        assert_eq!(r.u8(), Err(WireError::Truncated));
        assert_eq!(r.expect_end(), Ok(()));
        let mut r = Reader::new(&b[..3]);
        assert_eq!(r.u32(), Err(WireError::Truncated));
        assert_eq!(r.take(usize::MAX), Err(WireError::Truncated));
        assert_eq!(r.remaining(), 3, "a failed read consumes nothing");
        assert_eq!(r.expect_end(), Err(WireError::TrailingBytes));
    }

    #[test]
    fn sub_reader_and_vectors_are_confined() {
        let b = [2u8, 0xaa, 0xbb, 0xcc, 0, 5, 1];
        let mut r = Reader::new(&b);
        assert_eq!(r.vec8(), Ok(&[0xaa, 0xbb][..]));
        let mut s = r.sub(1).unwrap();
        assert_eq!(s.u16(), Err(WireError::Truncated));
        assert_eq!(s.u8(), Ok(0xcc));
        assert_eq!(r.vec16(), Err(WireError::Truncated));
        assert_eq!(r.remaining(), 3, "a failed vector read consumes nothing");
        let mut out = Vec::new();
        assert_eq!(
            put_vec8(&mut out, &[0; 9], 8, "x"),
            Err(WireError::BadField("x"))
        );
        assert_eq!(
            put_vec8(&mut out, &[0; 256], 300, "x"),
            Err(WireError::BadField("x"))
        );
        assert_eq!(put_vec16(&mut out, &[7; 3], 3, "y"), Ok(()));
        assert_eq!(out, vec![0, 3, 7, 7, 7]);
        assert!(put_vec16(&mut out, &vec![0; 70_000], usize::MAX, "y").is_err());
    }
}
