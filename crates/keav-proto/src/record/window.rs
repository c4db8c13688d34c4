//! The receiver's sliding anti-replay window over record sequence numbers.

use super::RecordError;

/// Number of sequence numbers the window covers: the highest accepted one and the
/// `REPLAY_WINDOW - 1` below it.
pub const REPLAY_WINDOW: u64 = 1024;

pub(super) const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// A bitmap ring indexed by `seq mod REPLAY_WINDOW`; a bit is set when that sequence number
/// was accepted. Bits of sequence numbers below the window are meaningless (those are refused
/// as stale before the bitmap is consulted).
#[derive(Clone, Debug)]
pub(super) struct ReplayWindow {
    highest: Option<u64>,
    bits: [u64; WORDS],
}

/// Word index and bit mask of `seq` in the ring. The mask on the index keeps it in bounds.
#[inline]
pub(super) fn position(seq: u64) -> (usize, u64) {
    let i = seq % REPLAY_WINDOW;
    (((i / 64) as usize) & (WORDS - 1), 1u64 << (i % 64))
}

impl ReplayWindow {
    pub(super) fn new() -> Self {
        ReplayWindow {
            highest: None,
            bits: [0; WORDS],
        }
    }

    /// The sequence number that would extend the accepted run without a gap.
    pub(super) fn next_expected(&self) -> u64 {
        self.highest.map_or(0, |h| h.saturating_add(1))
    }

    /// Whether `seq` may still be accepted: newer than everything seen, or inside the window
    /// and not yet seen. Does not change the window.
    #[inline]
    pub(super) fn check(&self, seq: u64) -> Result<(), RecordError> {
        let Some(h) = self.highest else {
            return Ok(());
        };
        if seq > h {
            return Ok(());
        }
        if h - seq >= REPLAY_WINDOW {
            return Err(RecordError::Stale);
        }
        let (w, m) = position(seq);
        if self.bits[w] & m != 0 {
            Err(RecordError::Replay)
        } else {
            Ok(())
        }
    }

    /// Marks `seq` as accepted, sliding the window forward if it is the new highest. Call only
    /// after [`ReplayWindow::check`] passed and the record authenticated.
    #[inline]
    pub(super) fn mark(&mut self, seq: u64) {
        match self.highest {
            Some(h) if seq <= h => {}
            Some(h) => {
                let gap = seq - h;
                if gap >= REPLAY_WINDOW {
                    self.bits = [0; WORDS];
                } else {
                    // Clear the ring positions of h+1 ..= seq (stale bits from a lap ago),
                    // a word at a time.
                    let mut s = h + 1;
                    let mut left = gap;
                    while left > 0 {
                        let (w, _) = position(s);
                        let bit = s % 64;
                        let n = (64 - bit).min(left);
                        let mask = if n == 64 {
                            u64::MAX
                        } else {
                            ((1u64 << n) - 1) << bit
                        };
                        self.bits[w] &= !mask;
                        left -= n;
                        s = s.wrapping_add(n);
                    }
                }
                self.highest = Some(seq);
            }
            None => self.highest = Some(seq),
        }
        let (w, m) = position(seq);
        self.bits[w] |= m;
    }

    /// The window's content (highest accepted number, bitmap), for persisting it.
    pub(super) fn parts(&self) -> (Option<u64>, [u64; WORDS]) {
        (self.highest, self.bits)
    }

    /// Rebuilds a window from [`ReplayWindow::parts`]. The caller validates the parts.
    pub(super) fn from_parts(highest: Option<u64>, bits: [u64; WORDS]) -> Self {
        ReplayWindow { highest, bits }
    }

    /// The highest sequence number accepted so far.
    #[cfg(test)]
    pub(super) fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference model: the set of accepted numbers, no bitmap.
    struct Model {
        seen: std::collections::BTreeSet<u64>,
    }

    impl Model {
        fn check(&self, seq: u64) -> Result<(), RecordError> {
            match self.seen.iter().next_back() {
                None => Ok(()),
                Some(&h) if seq > h => Ok(()),
                Some(&h) if h - seq >= REPLAY_WINDOW => Err(RecordError::Stale),
                Some(_) if self.seen.contains(&seq) => Err(RecordError::Replay),
                Some(_) => Ok(()),
            }
        }
    }

    #[test]
    fn window_matches_set_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for start in [0u64, 63, 1000, u64::MAX - 5000] {
            let mut w = ReplayWindow::new();
            let mut m = Model {
                seen: Default::default(),
            };
            let mut top = start;
            for _ in 0..20_000 {
                // Mostly small steps forward, sometimes big jumps, often looking back.
                let seq = match rng.gen_range(0..10) {
                    0..=3 => top.saturating_add(rng.gen_range(0..70)),
                    4 => top.saturating_add(rng.gen_range(0..3000)),
                    _ => top.saturating_sub(rng.gen_range(0..1100)),
                };
                let got = w.check(seq);
                assert_eq!(got, m.check(seq), "seq {seq} top {top}");
                if got.is_ok() {
                    w.mark(seq);
                    m.seen.insert(seq);
                    top = top.max(seq);
                }
            }
        }
    }

    #[test]
    fn window_edges() {
        let mut w = ReplayWindow::new();
        w.mark(2000);
        assert_eq!(w.check(2000), Err(RecordError::Replay));
        assert_eq!(w.check(2000 - 1023), Ok(()));
        assert_eq!(w.check(2000 - 1024), Err(RecordError::Stale));
        w.mark(2000 - 1023);
        assert_eq!(w.check(2000 - 1023), Err(RecordError::Replay));
        // Sliding by one makes the oldest one stale, not replayed.
        w.mark(2001);
        assert_eq!(w.check(2000 - 1023), Err(RecordError::Stale));
        assert_eq!(w.check(1999), Ok(()));
        w.mark(u64::MAX);
        assert_eq!(w.highest(), Some(u64::MAX));
        assert_eq!(w.check(u64::MAX), Err(RecordError::Replay));
        assert_eq!(w.check(u64::MAX - 1), Ok(()));
        assert_eq!(w.check(2001), Err(RecordError::Stale));
    }
}
