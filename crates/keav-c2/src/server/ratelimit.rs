//! Per-device inbound rate limit: a token bucket per sender, checked on the topic's sender
//! id before any parsing or signature work, so a flooding device costs a hash-map lookup per
//! message and cannot starve the others.
//!
//! Sans-IO: the caller passes the time (milliseconds, monotonic).

use std::collections::HashMap;

use crate::keys::DeviceId;

/// How fast each device may send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Messages a device may send at once (the bucket's size).
    pub burst: u32,
    /// Messages per second added back to the bucket (0: only the burst, ever).
    pub per_sec: f64,
}

impl Default for RateLimit {
    /// 200 messages at once, then 50 a second.
    fn default() -> Self {
        RateLimit {
            burst: 200,
            per_sec: 50.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ms: u64,
    /// Messages refused since the last log line about this device.
    refused: u64,
}

/// What [`Limiter::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: go on.
    Pass,
    /// Over the limit: drop. `log` says whether to log it (the first refusal of a run of
    /// refusals, then every 1000th), `refused` how many since the last log line.
    Limited {
        /// Whether to log this one.
        log: bool,
        /// Refusals since the last log line (this one included).
        refused: u64,
    },
}

/// The buckets of every device seen (at most [`Limiter::MAX_DEVICES`]; full buckets are
/// forgotten first when there are more).
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    buckets: HashMap<DeviceId, Bucket>,
}

impl Limiter {
    /// Most buckets kept.
    pub const MAX_DEVICES: usize = 100_000;

    /// A limiter with `limit` for every device.
    pub fn new(limit: RateLimit) -> Limiter {
        Limiter {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token from `device`'s bucket at time `now_ms`.
    pub fn check(&mut self, device: DeviceId, now_ms: u64) -> Verdict {
        let burst = f64::from(self.limit.burst.max(1));
        let rate = if self.limit.per_sec.is_finite() && self.limit.per_sec > 0.0 {
            self.limit.per_sec
        } else {
            0.0
        };
        if !self.buckets.contains_key(&device) && self.buckets.len() >= Self::MAX_DEVICES {
            self.prune(now_ms, burst, rate);
        }
        let b = self.buckets.entry(device).or_insert(Bucket {
            tokens: burst,
            last_ms: now_ms,
            refused: 0,
        });
        let elapsed = now_ms.saturating_sub(b.last_ms);
        b.last_ms = b.last_ms.max(now_ms);
        // Lossy for huge gaps, which only fill the bucket anyway.
        #[allow(clippy::cast_precision_loss)]
        let refill = elapsed as f64 / 1000.0 * rate;
        b.tokens = (b.tokens + refill).min(burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            if b.tokens >= 1.0 {
                // The run of refusals, if any, is over.
                b.refused = 0;
            }
            Verdict::Pass
        } else {
            b.refused = b.refused.saturating_add(1);
            Verdict::Limited {
                log: b.refused == 1 || b.refused % 1000 == 0,
                refused: b.refused,
            }
        }
    }

    /// Forgets buckets that are full by now (they behave as new ones); if none is, the
    /// oldest half.
    fn prune(&mut self, now_ms: u64, burst: f64, rate: f64) {
        #[allow(clippy::cast_precision_loss)]
        self.buckets.retain(|_, b| {
            b.tokens + now_ms.saturating_sub(b.last_ms) as f64 / 1000.0 * rate < burst
        });
        if self.buckets.len() >= Self::MAX_DEVICES {
            let mut ages: Vec<u64> = self.buckets.values().map(|b| b.last_ms).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.buckets.retain(|_, b| b.last_ms > cut);
        }
    }

    /// Buckets kept now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passes(l: &mut Limiter, d: DeviceId, now: u64, n: usize) -> usize {
        (0..n).filter(|_| l.check(d, now) == Verdict::Pass).count()
    }

    #[test]
    fn a_flood_is_cut_at_the_burst_and_others_still_pass() {
        let mut l = Limiter::new(RateLimit {
            burst: 5,
            per_sec: 0.0,
        });
        let (a, b) = (DeviceId([1; 8]), DeviceId([2; 8]));
        assert_eq!(passes(&mut l, a, 0, 100), 5);
        // Much later: no refill at rate 0.
        assert_eq!(passes(&mut l, a, 1_000_000, 10), 0);
        assert_eq!(passes(&mut l, b, 1_000_000, 5), 5);
        assert!(matches!(
            l.check(b, 1_000_000),
            Verdict::Limited {
                log: true,
                refused: 1
            }
        ));
    }

    #[test]
    fn tokens_come_back_at_the_rate_and_never_beyond_the_burst() {
        let mut l = Limiter::new(RateLimit {
            burst: 10,
            per_sec: 2.0,
        });
        let a = DeviceId([1; 8]);
        assert_eq!(passes(&mut l, a, 0, 50), 10);
        // One second: two tokens.
        assert_eq!(passes(&mut l, a, 1000, 50), 2);
        // An hour: the bucket is full, not 7200 tokens.
        assert_eq!(passes(&mut l, a, 3_601_000, 50_000), 10);
        // Time going backwards refills nothing.
        assert_eq!(passes(&mut l, a, 0, 10), 0);
    }

    #[test]
    fn refusals_are_logged_once_per_run_then_every_thousandth() {
        let mut l = Limiter::new(RateLimit {
            burst: 1,
            per_sec: 0.0,
        });
        let a = DeviceId([1; 8]);
        assert_eq!(l.check(a, 0), Verdict::Pass);
        let logged = (0..2500)
            .filter(|_| matches!(l.check(a, 0), Verdict::Limited { log: true, .. }))
            .count();
        assert_eq!(logged, 3); // 1st, 1000th, 2000th
    }

    #[test]
    fn many_senders_do_not_grow_memory_without_bound() {
        let mut l = Limiter::new(RateLimit {
            burst: 2,
            per_sec: 1000.0,
        });
        for i in 0..(Limiter::MAX_DEVICES as u64 + 10) {
            let _ = l.check(DeviceId(i.to_be_bytes()), i);
        }
        assert!(l.len() <= Limiter::MAX_DEVICES);
    }
}
