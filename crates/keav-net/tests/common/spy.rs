//! What a subscriber to every keav topic/subject on a broker saw, shared by the MQTT and NATS
//! tests: a log of (topic, payload) with bounded waits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One message as the broker delivered it: topic or subject, payload.
pub type Entry = (String, Vec<u8>);

/// The eavesdropper's log; clones share it.
#[derive(Clone, Default)]
pub struct SpyLog(Arc<Mutex<Vec<Entry>>>);

impl SpyLog {
    /// Appends one delivered message.
    pub fn push(&self, topic: String, payload: Vec<u8>) {
        self.0.lock().unwrap().push((topic, payload));
    }

    /// Everything seen so far.
    pub fn snapshot(&self) -> Vec<Entry> {
        self.0.lock().unwrap().clone()
    }

    /// How often exactly this message was seen.
    pub fn count(&self, topic: &str, payload: &[u8]) -> usize {
        let log = self.0.lock().unwrap();
        log.iter()
            .filter(|(t, p)| t == topic && p == payload)
            .count()
    }

    /// Waits (bounded: 5 s) until `pred` holds for the log; panics naming `what` otherwise.
    /// `pred` runs with the log locked: it must not call back into this log.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Entry]) -> bool) {
        for _ in 0..200 {
            if pred(&self.0.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the eavesdropper never saw {what}");
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether something listens on `addr`; prints a notice naming `what` if not (the test then
/// passes without running, on machines without that broker).
pub fn listening(addr: &str, what: &str) -> bool {
    let up = addr
        .parse()
        .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
        .unwrap_or(false);
    if !up {
        eprintln!("NOTICE: no {what} on {addr}: {what} test skipped");
    }
    up
}

/// The records one broker payload carries: itself if it is a record (data `0x17` or close
/// `0x15`), the records of a well-formed record batch (`0x42`), none otherwise.
pub fn records_in(payload: &[u8]) -> Vec<&[u8]> {
    use keav_proto::record::batch::{records, BATCH_TAG};
    match payload.first() {
        Some(0x17 | 0x15) => vec![payload],
        Some(&BATCH_TAG) => records(payload)
            .map(|rs| rs.filter_map(|r| payload.get(r)).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Records of type `kind` (`0x17` data, `0x15` close) in the payloads of `log` whose topic
/// passes `topic`, batched ones included.
pub fn count_records(log: &[Entry], topic: impl Fn(&str) -> bool, kind: u8) -> usize {
    log.iter()
        .filter(|(t, _)| topic(t))
        .flat_map(|(_, p)| records_in(p))
        .filter(|r| r.first() == Some(&kind))
        .count()
}
