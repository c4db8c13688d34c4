//! The seeded lossy carrier of the delivery simulations (tests/delivery.rs and
//! tests/delivery_state.rs): drops, duplicates and delays (hence reorders) what it carries.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::Rng;

/// One direction of the lossy carrier.
pub struct Link<T> {
    in_flight: Vec<(u64, T)>,
    drop_p: f64,
    dup_p: f64,
    max_delay_ms: u64,
}

impl<T: Clone> Link<T> {
    pub fn new(drop_p: f64, dup_p: f64, max_delay_ms: u64) -> Self {
        Self {
            in_flight: Vec::new(),
            drop_p,
            dup_p,
            max_delay_ms,
        }
    }

    pub fn send(&mut self, rng: &mut StdRng, now: u64, item: T) {
        if rng.gen_bool(self.drop_p) {
            return;
        }
        if rng.gen_bool(self.dup_p) {
            let at = now + rng.gen_range(1..=self.max_delay_ms);
            self.in_flight.push((at, item.clone()));
        }
        let at = now + rng.gen_range(1..=self.max_delay_ms);
        self.in_flight.push((at, item));
    }

    pub fn next_time(&self) -> Option<u64> {
        self.in_flight.iter().map(|(t, _)| *t).min()
    }

    /// Everything due at `now`, in arbitrary (delay-shuffled) order.
    pub fn take_due(&mut self, now: u64) -> Vec<T> {
        let (due, rest): (Vec<_>, Vec<_>) = self.in_flight.drain(..).partition(|(t, _)| *t <= now);
        self.in_flight = rest;
        due.into_iter().map(|(_, x)| x).collect()
    }
}
