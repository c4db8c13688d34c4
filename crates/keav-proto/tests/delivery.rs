//! Simulation: an [`Outbox`] and an [`Inbox`] joined by a seeded lossy channel that drops,
//! duplicates, reorders and delays in both directions (acks are lost too). Every message must
//! arrive exactly once, in order, and the outbox must end empty, within a bounded number of
//! simulated steps. Time is simulated: nothing here reads a clock.

use keav_proto::delivery::{Admission, Inbox, InboxLimits, Outbox, OutboxLimits};
use rand::rngs::StdRng;
use rand::SeedableRng;

mod lossy_link;
use lossy_link::Link;

fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.resize(8 + (seq % 57) as usize, (seq % 251) as u8);
    p
}

struct Outcome {
    steps: u64,
    transmissions: u64,
}

fn simulate(seed: u64, n: u64, drop_p: f64, dup_p: f64, rto_initial_ms: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let out_limits = OutboxLimits {
        max_records: 48,
        max_bytes: 2048,
        rto_initial_ms,
        rto_max_ms: 2000,
    };
    // A small inbox (fewer slots than records in flight: early records get dropped and
    // resent) unless the timeout is long, where the inbox can hold the whole outbox.
    let in_limits = if rto_initial_ms < 1_000 {
        InboxLimits {
            max_pending: 16,
            max_pending_bytes: 400,
            max_payload: 64,
        }
    } else {
        InboxLimits {
            max_pending: 48,
            max_pending_bytes: 49 * 64,
            max_payload: 64,
        }
    };
    let mut outbox = Outbox::new(out_limits).unwrap();
    let mut inbox = Inbox::new(0, in_limits).unwrap();
    let mut data: Link<(u64, Vec<u8>)> = Link::new(drop_p, dup_p, 150);
    let mut acks: Link<u64> = Link::new(drop_p, dup_p, 150);

    let mut next_push = 0u64;
    let mut received = Vec::with_capacity(n as usize);
    let mut now = 0u64;
    let mut steps = 0u64;
    let mut transmissions = 0u64;
    let max_steps = 40 * n + 10_000;

    while received.len() < n as usize || !outbox.is_empty() {
        steps += 1;
        assert!(
            steps < max_steps,
            "seed {seed}: no progress after {steps} steps"
        );

        // Sender application: push while the outbox takes more.
        while next_push < n {
            match outbox.push(next_push, payload(next_push), now) {
                Ok(()) => next_push += 1,
                Err(e) => {
                    assert_eq!(e, keav_proto::delivery::DeliveryError::Full);
                    // Full only ever means old records are still held.
                    assert!(!outbox.is_empty());
                    break;
                }
            }
        }
        assert!(outbox.len() <= out_limits.max_records);
        assert!(outbox.bytes() <= out_limits.max_bytes);

        // Sender publisher: everything due goes on the carrier.
        while let Some((seq, record)) = outbox.poll_transmit(now) {
            transmissions += 1;
            let record = record.to_vec();
            data.send(&mut rng, now, (seq, record));
        }

        // Receiver: cheap check, "open", insert, ack (also for duplicates: the ack may have
        // been lost), then the application takes everything in order.
        for (seq, record) in data.take_due(now) {
            match inbox.admit(seq) {
                Admission::Accept => inbox.insert(seq, record).unwrap(),
                Admission::Duplicate => {}
                Admission::TooFarAhead | Admission::NoRoom => continue,
            }
            assert!(inbox.pending() <= in_limits.max_pending);
            assert!(inbox.pending_bytes() <= in_limits.max_pending_bytes);
            while let Some((seq, p)) = inbox.pop() {
                assert_eq!(seq, received.len() as u64, "seed {seed}: out of order");
                assert_eq!(p, payload(seq), "seed {seed}: wrong payload");
                received.push(seq);
            }
            acks.send(&mut rng, now, inbox.ack());
        }

        // Sender: acks (reordered or duplicated ones are refused as stale and change nothing).
        for ack in acks.take_due(now) {
            let before = (outbox.len(), outbox.acked());
            if outbox.on_ack(ack).is_err() {
                assert_eq!((outbox.len(), outbox.acked()), before);
            }
        }

        // Advance simulated time to the next event.
        let next = [outbox.poll_timeout(), data.next_time(), acks.next_time()]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(t) => now = now.max(t),
            None => assert!(received.len() == n as usize && outbox.is_empty()),
        }
    }

    assert_eq!(received, (0..n).collect::<Vec<_>>());
    assert!(outbox.is_empty());
    assert_eq!(outbox.bytes(), 0);
    assert_eq!(inbox.pending(), 0);
    assert_eq!(inbox.ack(), n);
    assert_eq!(outbox.acked(), n);
    Outcome {
        steps,
        transmissions,
    }
}

#[test]
fn lossy_channel_delivers_10_000_exactly_once_in_order() {
    for seed in [1, 2] {
        let o = simulate(seed, 10_000, 0.2, 0.1, 40);
        eprintln!(
            "seed {seed}: {} steps, {} transmissions",
            o.steps, o.transmissions
        );
        // Losses force resends: more transmissions than messages.
        assert!(o.transmissions > 10_000, "seed {seed}: {}", o.transmissions);
        assert!(o.steps > 0);
    }
}

#[test]
fn heavy_loss_still_delivers() {
    let o = simulate(7, 2_000, 0.5, 0.3, 40);
    assert!(o.transmissions > 2 * 2_000);
}

#[test]
fn perfect_channel_with_long_timeout_sends_each_record_once() {
    // No loss, no duplicates, an inbox that holds the whole outbox, and a first resend
    // timeout (1 s) above the longest round trip (300 ms): every record goes out once.
    let o = simulate(3, 1_000, 0.0, 0.0, 1_000);
    assert_eq!(o.transmissions, 1_000);
}
