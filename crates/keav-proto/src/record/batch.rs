//! Record batches: several records of one direction carried in one datagram.
//!
//! A carrier whose unit is a message (an MQTT publish, a NATS message) pays a fixed cost per
//! message in the broker and in both clients. A sender that has several records ready at
//! once may put them in one *batch* instead of one message each:
//!
//! ```text
//! +------+-----------+----------+-----------+----------+-----
//! | 0x42 | len u16BE | record 1 | len u16BE | record 2 | ...
//! +------+-----------+----------+-----------+----------+-----
//! ```
//!
//! - at least two records (a single record travels as it is, so a batch of one never
//!   appears on the wire), each of [`RECORD_OVERHEAD`] ..= [`MAX_RECORD_LEN`] bytes, in the
//!   order they were sealed;
//! - at most [`MAX_BATCH_LEN`] bytes in all, the size of the largest single record: a
//!   receiver that takes every record takes every batch.
//!
//! The batch framing is not authenticated, and need not be: every record in it is, on its
//! own, exactly as if it had come alone. Whoever can change a batch on the way can drop,
//! duplicate, reorder or cut records, which the carrier could do to single records anyway and
//! which the opener's replay window handles. A batch is parsed completely before any of its
//! records is used ([`records`]); a malformed one is refused as a whole.
//!
//! [`BatchBuilder`] writes batches: records are sealed straight into its buffer, and a
//! buffer holding one record is that record, byte for byte.

use core::ops::Range;

use super::{RecordError, MAX_RECORD_LEN, RECORD_OVERHEAD};

/// First byte of a record batch (no record type, ZRTP packet, bare RFC 6189 message or mail
/// tag starts with it).
pub const BATCH_TAG: u8 = 0x42;
/// Largest batch on the wire: the largest single record.
pub const MAX_BATCH_LEN: usize = MAX_RECORD_LEN;
/// Bytes of the tag.
const TAG: usize = 1;
/// Bytes of each record's length prefix.
const LEN: usize = 2;

/// The byte ranges of the records in `batch`, in order, once the whole batch was checked.
///
/// Errors ([`RecordError::BadBatch`], naming the reason): another first byte, more than
/// [`MAX_BATCH_LEN`] bytes, fewer than two records, a length prefix cut off, a record
/// shorter than [`RECORD_OVERHEAD`], longer than [`MAX_RECORD_LEN`] or running past the end.
pub fn records(batch: &[u8]) -> Result<Records<'_>, RecordError> {
    if batch.first() != Some(&BATCH_TAG) {
        return Err(RecordError::BadBatch("not a batch"));
    }
    if batch.len() > MAX_BATCH_LEN {
        return Err(RecordError::BadBatch("batch too long"));
    }
    let mut count = 0usize;
    let mut it = Records { batch, at: TAG };
    while it.at < batch.len() {
        it.step()?;
        count += 1;
    }
    if count < 2 {
        return Err(RecordError::BadBatch("fewer than two records"));
    }
    Ok(Records { batch, at: TAG })
}

/// The records of a checked batch ([`records`]): byte ranges into it.
#[derive(Clone, Debug)]
pub struct Records<'a> {
    batch: &'a [u8],
    at: usize,
}

impl Records<'_> {
    /// The next record's range, checked.
    fn step(&mut self) -> Result<Range<usize>, RecordError> {
        let len = self
            .batch
            .get(self.at..)
            .and_then(|rest| rest.first_chunk::<LEN>())
            .map(|l| usize::from(u16::from_be_bytes(*l)))
            .ok_or(RecordError::BadBatch("length prefix cut off"))?;
        if len < RECORD_OVERHEAD {
            return Err(RecordError::BadBatch("record shorter than its overhead"));
        }
        if len > MAX_RECORD_LEN {
            return Err(RecordError::BadBatch("record too long"));
        }
        let start = self.at + LEN;
        let end = start + len;
        if end > self.batch.len() {
            return Err(RecordError::BadBatch("record runs past the end"));
        }
        self.at = end;
        Ok(start..end)
    }
}

impl Iterator for Records<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.at >= self.batch.len() {
            return None;
        }
        // Checked by `records`: never an error here (stop rather than panic if it were).
        self.step().ok()
    }
}

/// Collects sealed records into one datagram: a bare record while it holds one, a batch from
/// the second record on.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: usize,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> BatchBuilder {
        BatchBuilder::default()
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if it holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a record of `record_len` bytes can be added without the datagram growing
    /// beyond [`MAX_BATCH_LEN`]. Always true when empty.
    pub fn fits(&self, record_len: usize) -> bool {
        let extra = match self.count {
            0 => return true,
            1 => TAG + LEN + LEN,
            _ => LEN,
        };
        self.buf.len() + extra + record_len <= MAX_BATCH_LEN
    }

    /// Adds the record that `seal` appends to the buffer it is given (as
    /// [`super::Sealer::seal`] does). If `seal` fails, or appends nothing or a record of a
    /// length a batch cannot hold, nothing is added; `seal`'s error is returned, or
    /// [`RecordError::BadBatch`]. The caller checks [`BatchBuilder::fits`] first; a record
    /// that does not fit is refused the same way.
    pub fn push(
        &mut self,
        seal: impl FnOnce(&mut Vec<u8>) -> Result<(), RecordError>,
    ) -> Result<(), RecordError> {
        if self.count == 0 {
            seal(&mut self.buf)?;
            if !(RECORD_OVERHEAD..=MAX_RECORD_LEN).contains(&self.buf.len()) {
                self.buf.clear();
                return Err(RecordError::BadBatch("record of a length no batch holds"));
            }
            self.count = 1;
            return Ok(());
        }
        let before = self.buf.len();
        let first_len = before;
        // Room for this record's length prefix; sealed after it.
        self.buf.extend_from_slice(&[0; LEN]);
        let sealed = seal(&mut self.buf);
        let len = self.buf.len() - before - LEN;
        let extra = if self.count == 1 { TAG + LEN } else { 0 };
        let ok = sealed.is_ok()
            && (RECORD_OVERHEAD..=MAX_RECORD_LEN).contains(&len)
            && self.buf.len() + extra <= MAX_BATCH_LEN;
        if !ok {
            self.buf.truncate(before);
            sealed?;
            return Err(RecordError::BadBatch("record does not fit the batch"));
        }
        if let Some(prefix) = self.buf.get_mut(before..before + LEN) {
            prefix.copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        }
        if self.count == 1 {
            // The bare first record becomes the batch's first entry.
            let head = u16::try_from(first_len).unwrap_or(u16::MAX).to_be_bytes();
            self.buf
                .splice(0..0, [BATCH_TAG, head[0], head[1]])
                .for_each(drop);
        }
        self.count += 1;
        Ok(())
    }

    /// Hands out the datagram (a bare record or a batch) and leaves the builder empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.count = 0;
        core::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake "record": `len` bytes starting with `tag`.
    fn rec(tag: u8, len: usize) -> Vec<u8> {
        let mut r = vec![tag; len];
        r[0] = 0x17;
        r
    }

    fn push(b: &mut BatchBuilder, r: &[u8]) -> Result<(), RecordError> {
        b.push(|out| {
            out.extend_from_slice(r);
            Ok(())
        })
    }

    fn split(d: &[u8]) -> Vec<Vec<u8>> {
        records(d)
            .expect("a well-formed batch")
            .map(|r| d[r].to_vec())
            .collect()
    }

    #[test]
    fn one_record_is_the_record_itself_and_more_make_a_batch_that_round_trips() {
        let mut b = BatchBuilder::new();
        let r1 = rec(1, 40);
        push(&mut b, &r1).unwrap();
        assert_eq!(b.len(), 1);
        let d = b.take();
        assert_eq!(d, r1);
        assert!(b.is_empty());
        assert!(records(&d).is_err(), "a single record is not a batch");

        let rs = [rec(2, 29), rec(3, 100), rec(4, 1000)];
        for r in &rs {
            push(&mut b, r).unwrap();
        }
        let d = b.take();
        assert_eq!(d[0], BATCH_TAG);
        assert_eq!(d.len(), 1 + 3 * 2 + 29 + 100 + 1000);
        assert_eq!(split(&d), rs.to_vec());
    }

    #[test]
    fn fits_keeps_every_batch_within_the_largest_record() {
        let mut b = BatchBuilder::new();
        assert!(b.fits(MAX_RECORD_LEN));
        push(&mut b, &rec(1, MAX_RECORD_LEN)).unwrap();
        assert!(!b.fits(RECORD_OVERHEAD));
        // Refused even if the caller did not ask: nothing changes.
        assert!(matches!(
            push(&mut b, &rec(2, RECORD_OVERHEAD)),
            Err(RecordError::BadBatch(_))
        ));
        assert_eq!(b.take(), rec(1, MAX_RECORD_LEN));

        let half = (MAX_BATCH_LEN - 5) / 2;
        push(&mut b, &rec(1, half)).unwrap();
        assert!(b.fits(half));
        push(&mut b, &rec(2, half)).unwrap();
        assert!(!b.fits(RECORD_OVERHEAD));
        let d = b.take();
        assert!(d.len() <= MAX_BATCH_LEN);
        assert_eq!(split(&d).len(), 2);
    }

    #[test]
    fn a_failed_seal_adds_nothing() {
        let mut b = BatchBuilder::new();
        assert_eq!(
            b.push(|_| Err(RecordError::Closed)),
            Err(RecordError::Closed)
        );
        assert!(b.is_empty() && b.take().is_empty());
        push(&mut b, &rec(1, 50)).unwrap();
        assert_eq!(
            b.push(|out| {
                out.push(9);
                Err(RecordError::TooLong)
            }),
            Err(RecordError::TooLong)
        );
        // A "seal" that appends something no record can be.
        assert!(push(&mut b, &[0x17; 3]).is_err());
        assert_eq!(b.take(), rec(1, 50));
    }

    #[test]
    fn malformed_batches_are_refused_as_a_whole() {
        let mut b = BatchBuilder::new();
        for r in [rec(1, 30), rec(2, 31)] {
            push(&mut b, &r).unwrap();
        }
        let good = b.take();
        assert_eq!(split(&good).len(), 2);

        let mut bad = Vec::new();
        // Every truncation.
        for cut in 0..good.len() {
            bad.push(good[..cut].to_vec());
        }
        // Wrong tag; a trailing byte; a zero and an oversized length.
        let mut t = good.clone();
        t[0] = 0x17;
        bad.push(t);
        let mut t = good.clone();
        t.push(0);
        bad.push(t);
        let mut t = good.clone();
        t[1..3].copy_from_slice(&0u16.to_be_bytes());
        bad.push(t);
        let mut t = good.clone();
        t[1..3].copy_from_slice(&u16::MAX.to_be_bytes());
        bad.push(t);
        // One record only, with a valid prefix.
        let mut t = vec![BATCH_TAG];
        t.extend_from_slice(&30u16.to_be_bytes());
        t.extend_from_slice(&rec(1, 30));
        bad.push(t);
        // Longer than any batch.
        let mut t = vec![BATCH_TAG];
        for _ in 0..2 {
            t.extend_from_slice(&(MAX_RECORD_LEN as u16).to_be_bytes());
            t.extend_from_slice(&rec(1, MAX_RECORD_LEN));
        }
        bad.push(t);
        for d in &bad {
            assert!(
                matches!(records(d), Err(RecordError::BadBatch(_))),
                "accepted a malformed batch of {} bytes",
                d.len()
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_ones_stay_inside() {
        // A small deterministic generator: no test dependency needed.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(f) = d.first_mut() {
                *f = BATCH_TAG;
            }
            // Small lengths, so some inputs parse.
            let mut i = 1;
            while i + 1 < d.len() {
                d[i] = 0;
                d[i + 1] = 29 + (next() % 8) as u8;
                i += 2 + usize::from(d[i + 1]);
            }
            if let Ok(rs) = records(&d) {
                let mut end = 1;
                for r in rs {
                    assert_eq!(r.start, end + 2);
                    assert!(r.end <= d.len() && r.len() >= RECORD_OVERHEAD);
                    end = r.end;
                }
                assert_eq!(end, d.len());
            }
        }
    }
}
