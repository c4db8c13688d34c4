//! Drives two ZRTP endpoints back to back in one process with a simulated
//! clock and records the exchange. Any endpoint implementing [`Peer`] can
//! take part (bzrtp here; keav's sans-IO endpoint later).

use std::fmt::Write as _;

use crate::bzrtp::BzrtpEndpoint;
use crate::wire;

/// What the driver needs from an endpoint.
pub trait Peer {
    /// Start the handshake at `now_ms` (may emit packets).
    fn start(&mut self, now_ms: u64) -> Result<(), i32>;
    /// Feed one incoming packet.
    fn process(&mut self, packet: &[u8], now_ms: u64) -> Result<(), i32>;
    /// Advance the clock (may emit retransmissions).
    fn iterate(&mut self, now_ms: u64) -> Result<(), i32>;
    /// Packets emitted since the last call.
    fn take_outgoing(&mut self) -> Vec<Vec<u8>>;
    /// Handshake finished on this side.
    fn is_secure(&self) -> bool;
}

impl Peer for BzrtpEndpoint {
    fn start(&mut self, now_ms: u64) -> Result<(), i32> {
        BzrtpEndpoint::start(self, now_ms)
    }
    fn process(&mut self, packet: &[u8], now_ms: u64) -> Result<(), i32> {
        BzrtpEndpoint::process(self, packet, now_ms)
    }
    fn iterate(&mut self, now_ms: u64) -> Result<(), i32> {
        BzrtpEndpoint::iterate(self, now_ms)
    }
    fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        BzrtpEndpoint::take_outgoing(self)
    }
    fn is_secure(&self) -> bool {
        BzrtpEndpoint::is_secure(self)
    }
}

/// Sender of a recorded packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The first endpoint given to [`run`].
    A,
    /// The second one.
    B,
}

/// One delivered packet.
#[derive(Clone, Debug)]
pub struct Record {
    /// Simulated time of delivery.
    pub t_ms: u64,
    /// Who sent it.
    pub from: Side,
    /// The packet.
    pub packet: Vec<u8>,
    /// Receiver's result (`Err(code)` if it rejected the packet).
    pub result: Result<(), i32>,
}

/// Driver options.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Time step between ticks.
    pub step_ms: u64,
    /// Give up after this much simulated time.
    pub timeout_ms: u64,
    /// Start B this long after A (`None`: B never starts on its own and
    /// only reacts to A's packets).
    pub b_start_delay_ms: Option<u64>,
    /// Keep ticking this long after both are secure (to flush retransmissions).
    pub linger_ms: u64,
    /// Start time.
    pub t0_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            step_ms: 10,
            timeout_ms: 10_000,
            b_start_delay_ms: Some(0),
            linger_ms: 0,
            t0_ms: 1_000,
        }
    }
}

/// Outcome of [`run`].
#[derive(Clone, Debug)]
pub struct Transcript {
    /// Every packet delivered, in order.
    pub records: Vec<Record>,
    /// Simulated time when both sides were secure.
    pub secure_at_ms: Option<u64>,
}

impl Transcript {
    /// Message names in delivery order, e.g. "A:Hello".
    pub fn summary(&self) -> Vec<String> {
        self.records
            .iter()
            .map(|r| format!("{:?}:{}", r.from, wire::message_name(&r.packet)))
            .collect()
    }

    /// A text dump, one packet per line: `t_ms from type result hex`.
    /// Lines starting with '#' are comments.
    pub fn to_text(&self, header: &str) -> String {
        let mut s = String::new();
        for line in header.lines() {
            let _ = writeln!(s, "# {line}");
        }
        let _ = writeln!(
            s,
            "# columns: t_ms sender message_type receiver_result hex_packet"
        );
        for r in &self.records {
            let res = match r.result {
                Ok(()) => "ok".to_owned(),
                Err(c) => format!("err:{c:#x}"),
            };
            let _ = writeln!(
                s,
                "{} {:?} {} {} {}",
                r.t_ms,
                r.from,
                wire::message_name(&r.packet),
                res,
                hex_encode(&r.packet)
            );
        }
        s
    }
}

fn hex_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Runs A and B against each other: each tick, both get the time, then
/// packets are delivered (A's to B and B's to A) until both queues are empty.
pub fn run(a: &mut dyn Peer, b: &mut dyn Peer, opts: Options) -> Result<Transcript, String> {
    let mut records = Vec::new();
    let mut now = opts.t0_ms;
    let end = opts.t0_ms + opts.timeout_ms;
    a.start(now)
        .map_err(|e| format!("A start failed: {e:#x}"))?;
    let mut b_started = false;
    let mut secure_at = None;
    while now <= end {
        if !b_started {
            if let Some(d) = opts.b_start_delay_ms {
                if now >= opts.t0_ms + d {
                    b.start(now)
                        .map_err(|e| format!("B start failed: {e:#x}"))?;
                    b_started = true;
                }
            }
        }
        let _ = a.iterate(now);
        let _ = b.iterate(now);
        loop {
            let from_a = a.take_outgoing();
            let from_b = b.take_outgoing();
            if from_a.is_empty() && from_b.is_empty() {
                break;
            }
            for p in from_a {
                let result = b.process(&p, now);
                records.push(Record {
                    t_ms: now,
                    from: Side::A,
                    packet: p,
                    result,
                });
            }
            for p in from_b {
                let result = a.process(&p, now);
                records.push(Record {
                    t_ms: now,
                    from: Side::B,
                    packet: p,
                    result,
                });
            }
        }
        if secure_at.is_none() && a.is_secure() && b.is_secure() {
            secure_at = Some(now);
        }
        if let Some(t) = secure_at {
            if now >= t + opts.linger_ms {
                break;
            }
        }
        now += opts.step_ms;
    }
    Ok(Transcript {
        records,
        secure_at_ms: secure_at,
    })
}
