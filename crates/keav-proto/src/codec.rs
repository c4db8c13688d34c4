//! A bounds-checked reader over untrusted bytes and the [`Codec`] trait every wire type
//! implements.
//!
//! All multi-byte integers on the ZRTP wire are big-endian (RFC 6189 §5). The reader never
//! panics: every accessor checks the remaining length first and returns
//! [`ParseError::Truncated`] when the input is too short. A [`Reader::sub`] reader confines a
//! nested structure to the bytes its length field announced, so a bad inner length can never
//! read past its enclosing structure.

use crate::error::ParseError;

/// A cursor over a borrowed byte slice with checked reads.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader positioned at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Takes the next `n` bytes, or [`ParseError::Truncated`] if fewer remain (the reader is
    /// then left unchanged).
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(n).ok_or(ParseError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(ParseError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, ParseError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a one-byte length, then that many bytes (nothing is consumed on failure).
    pub fn vec8(&mut self) -> Result<&'a [u8], ParseError> {
        let mut probe = self.clone();
        let n = probe.u8()?;
        let out = probe.take(usize::from(n))?;
        *self = probe;
        Ok(out)
    }

    /// Reads a two-byte big-endian length, then that many bytes (nothing is consumed on
    /// failure).
    pub fn vec16(&mut self) -> Result<&'a [u8], ParseError> {
        let mut probe = self.clone();
        let n = probe.u16()?;
        let out = probe.take(usize::from(n))?;
        *self = probe;
        Ok(out)
    }

    /// Reads exactly `N` bytes into an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let s = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// Splits off a reader over the next `n` bytes and advances past them.
    pub fn sub(&mut self, n: usize) -> Result<Reader<'a>, ParseError> {
        Ok(Reader::new(self.take(n)?))
    }

    /// Takes everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        out
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// How many bytes were consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// [`ParseError::TooLong`] unless every byte was consumed.
    pub fn expect_end(&self) -> Result<(), ParseError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(ParseError::TooLong)
        }
    }
}

/// A wire structure that can be written to and read from bytes.
pub trait Codec: Sized {
    /// Appends the wire form of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one value from `r`, consuming exactly its bytes.
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError>;

    /// The wire form of `self` in a fresh vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Parses a value that must occupy all of `b` (trailing bytes are
    /// [`ParseError::TooLong`]).
    fn from_bytes(b: &[u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(b);
        let v = Self::read(&mut r)?;
        r.expect_end()?;
        Ok(v)
    }
}

impl Codec for u8 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u8()
    }
}

impl Codec for u16 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u16()
    }
}

impl Codec for u32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u32()
    }
}

impl Codec for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_and_tracks_position() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut r = Reader::new(&b);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.u32(), Ok(0x0405_0607));
        assert_eq!(r.position(), 7);
        assert_eq!(r.remaining(), 2);
        assert_eq!(r.expect_end(), Err(ParseError::TooLong));
        assert_eq!(r.array::<2>(), Ok([8, 9]));
        assert_eq!(r.expect_end(), Ok(()));
        assert_eq!(r.u8(), Err(ParseError::Truncated));
    }

    #[test]
    fn short_reads_fail_without_consuming() {
        let b = [1u8, 2, 3];
        let mut r = Reader::new(&b);
        assert_eq!(r.u32(), Err(ParseError::Truncated));
        assert_eq!(r.take(4), Err(ParseError::Truncated));
        assert_eq!(r.take(usize::MAX), Err(ParseError::Truncated));
        assert_eq!(r.remaining(), 3);
        assert_eq!(r.take(3), Ok(&b[..]));
        assert_eq!(r.rest(), &[] as &[u8]);
    }

    #[test]
    fn u64_and_length_prefixed_vectors() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 2, 0xaa, 0xbb, 0, 3, 7, 7];
        let mut r = Reader::new(&b);
        assert_eq!(r.u64(), Ok(0x0102_0304_0506_0708));
        assert_eq!(r.vec8(), Ok(&[0xaa, 0xbb][..]));
        // The announced length (3) runs past the end: refused, and nothing is consumed.
        assert_eq!(r.vec16(), Err(ParseError::Truncated));
        assert_eq!(r.remaining(), 4);
        assert_eq!(r.u16(), Ok(3));
        assert_eq!(r.u64(), Err(ParseError::Truncated));
        assert_eq!(r.remaining(), 2, "a failed read consumes nothing");
        assert_eq!(Reader::new(&[]).vec8(), Err(ParseError::Truncated));
        assert_eq!(Reader::new(&[0]).vec16(), Err(ParseError::Truncated));
        assert_eq!(Reader::new(&[0, 0]).vec16(), Ok(&[][..]));
        assert_eq!(u64::from_bytes(&7u64.to_bytes()), Ok(7));
        assert_eq!(
            u64::MAX.to_bytes(),
            vec![0xff; 8],
            "big-endian, all eight bytes"
        );
    }

    #[test]
    fn sub_reader_is_confined() {
        let b = [1u8, 2, 3, 4, 5];
        let mut r = Reader::new(&b);
        let mut s = r.sub(2).unwrap();
        assert_eq!(r.remaining(), 3);
        assert_eq!(s.u8(), Ok(1));
        assert_eq!(s.u16(), Err(ParseError::Truncated));
        assert_eq!(s.rest(), &[2]);
        assert!(r.sub(4).is_err());
        assert_eq!(r.rest(), &[3, 4, 5]);
    }

    #[test]
    fn from_bytes_rejects_trailing() {
        assert_eq!(u16::from_bytes(&[0xab, 0xcd]), Ok(0xabcd));
        assert_eq!(u16::from_bytes(&[0xab, 0xcd, 0]), Err(ParseError::TooLong));
        assert_eq!(u32::from_bytes(&[0xab]), Err(ParseError::Truncated));
        assert_eq!(0x0102_0304u32.to_bytes(), vec![1, 2, 3, 4]);
    }
}
