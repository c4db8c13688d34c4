//! RFC 6189 §6 retransmission schedules, driven by the `now` the caller passes in.

/// A retransmission schedule: first interval, cap, and number of retransmissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// First retransmission interval in milliseconds.
    pub initial_ms: u64,
    /// The interval doubles after every retransmission up to this cap.
    pub cap_ms: u64,
    /// Retransmissions before giving up.
    pub max_retransmissions: u32,
}

impl Schedule {
    /// T1, for Hello: 50 ms doubling to 200 ms, 20 retransmissions (RFC 6189 §6).
    pub const T1: Schedule = Schedule {
        initial_ms: 50,
        cap_ms: 200,
        max_retransmissions: 20,
    };
    /// T2, for Commit, DHPart2, verification and Confirm2: 150 ms doubling to 1200 ms,
    /// 10 retransmissions (RFC 6189 §6).
    pub const T2: Schedule = Schedule {
        initial_ms: 150,
        cap_ms: 1200,
        max_retransmissions: 10,
    };

    /// Scales both intervals (for high-latency links, RFC 6189 §6 last paragraph).
    pub fn scaled(self, factor: u64) -> Schedule {
        Schedule {
            initial_ms: self.initial_ms.saturating_mul(factor.max(1)),
            cap_ms: self.cap_ms.saturating_mul(factor.max(1)),
            ..self
        }
    }
}

/// One running retransmission timer.
#[derive(Clone, Debug)]
pub(crate) struct Retransmit {
    schedule: Schedule,
    interval_ms: u64,
    sent: u32,
    deadline: u64,
}

impl Retransmit {
    /// Armed at `now` for the first retransmission.
    pub(crate) fn start(schedule: Schedule, now: u64) -> Self {
        Self {
            schedule,
            interval_ms: schedule.initial_ms,
            sent: 0,
            deadline: now.saturating_add(schedule.initial_ms),
        }
    }

    pub(crate) fn deadline(&self) -> u64 {
        self.deadline
    }

    /// Called when the deadline passed: `Some(true)` = retransmit now, `None` = give up.
    pub(crate) fn fire(&mut self, now: u64) -> Option<bool> {
        if now < self.deadline {
            return Some(false);
        }
        if self.sent >= self.schedule.max_retransmissions {
            return None;
        }
        self.sent += 1;
        self.interval_ms = (self.interval_ms.saturating_mul(2)).min(self.schedule.cap_ms);
        self.deadline = now.saturating_add(self.interval_ms);
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t2_schedule_matches_rfc_total() {
        // RFC 6189 §6: retransmissions 150, 300, 600, then 1200 ms apart, ten of them, the
        // last at 150 + 300 + 600 + 7 * 1200 = 9450 ms; we give up one interval later.
        let mut t = Retransmit::start(Schedule::T2, 0);
        let mut sent_at = Vec::new();
        let gave_up = loop {
            let now = t.deadline();
            match t.fire(now) {
                Some(true) => sent_at.push(now),
                Some(false) => unreachable!(),
                None => break now,
            }
        };
        assert_eq!(
            sent_at,
            [150, 450, 1050, 2250, 3450, 4650, 5850, 7050, 8250, 9450]
        );
        assert_eq!(gave_up, 10650);
    }

    #[test]
    fn does_not_fire_early() {
        let mut t = Retransmit::start(Schedule::T1, 1000);
        assert_eq!(t.fire(1049), Some(false));
        assert_eq!(t.fire(1050), Some(true));
        assert_eq!(t.deadline(), 1150);
    }
}
