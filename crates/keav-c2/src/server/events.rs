//! The operator's recent events: a bounded in-memory log of the server's notices, numbered
//! in order, for the web console and `GET /v1/c2/events?after=N` ([`super::http`]).
//!
//! The log keeps the last [`EVENT_LOG_LEN`] events of this server run; it is not persisted
//! (the registry and the response records are). A reader that fell behind more than that is
//! told how many it missed. Each event is a short text written for a person, plus a kind and
//! the device it concerns, so a client can filter without parsing the text. Messages the
//! server published are not logged (the response records track them); no key material is
//! ever part of a notice.

use std::collections::VecDeque;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::http::{method_name, status_name, token_hex};
use super::{ConfNotice, ServerNotice};
use crate::engine::{CommandKind, ServerEvent};
use crate::keys::DeviceId;
use crate::wire::{Data, Value};

/// Events kept in memory.
pub const EVENT_LOG_LEN: usize = 1000;
/// Most events one call returns.
pub const MAX_EVENTS_PER_CALL: usize = 500;
/// Most characters of a text or bytes value shown in an event.
const VALUE_SHOWN: usize = 120;

/// One logged event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventItem {
    /// Its number: 1 for the run's first event, one more for each next.
    pub seq: u64,
    /// When it was logged, seconds since the Unix epoch.
    pub time: u64,
    /// What kind of event (`response`, `data`, `joined`, `dropped`...).
    pub kind: String,
    /// The device it concerns (hex id), if one.
    pub device: Option<String>,
    /// What happened, for a person.
    pub text: String,
}

/// `GET /v1/c2/events` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsBody {
    /// This server run (numbers start again at 1 in each run: a reader that sees the run
    /// change asks again from 0).
    pub run: u64,
    /// Events after the number asked for, oldest first.
    pub events: Vec<EventItem>,
    /// The number to ask after next time (the last event's, or the one asked if none).
    pub next: u64,
    /// Events after the number asked for that are no longer kept.
    pub missed: u64,
}

/// The bounded log.
#[derive(Debug)]
pub struct EventLog {
    run: u64,
    last: u64,
    items: VecDeque<EventItem>,
}

impl EventLog {
    /// An empty log for the server run `run` (any number that differs between runs, such as
    /// the start time in milliseconds).
    pub fn new(run: u64) -> EventLog {
        EventLog {
            run,
            last: 0,
            items: VecDeque::new(),
        }
    }

    /// Logs a notice's description ([`describe`]) at `time`.
    pub fn push(&mut self, (kind, device, text): Description, time: u64) {
        self.last += 1;
        if self.items.len() == EVENT_LOG_LEN {
            self.items.pop_front();
        }
        self.items.push_back(EventItem {
            seq: self.last,
            time,
            kind: kind.to_string(),
            device: device.map(|d| d.to_hex()),
            text,
        });
    }

    /// At most `max` events numbered above `after`, oldest first. A number beyond the last
    /// event is a reader's from an earlier run: it gets this run's events from the start.
    pub fn after(&self, after: u64, max: usize) -> EventsBody {
        let after = if after > self.last { 0 } else { after };
        let first_kept = self.items.front().map_or(self.last + 1, |e| e.seq);
        let missed = first_kept.saturating_sub(after.saturating_add(1));
        let events: Vec<EventItem> = self
            .items
            .iter()
            .filter(|e| e.seq > after)
            .take(max)
            .cloned()
            .collect();
        let next = events.last().map_or(after, |e| e.seq);
        EventsBody {
            run: self.run,
            events,
            next,
            missed,
        }
    }
}

/// What an event says: its kind, the device it concerns, its text.
pub type Description = (&'static str, Option<DeviceId>, String);

/// The description of a notice worth an operator's attention; `None` (before any
/// formatting) for notices that are not logged.
pub fn describe(n: &ServerNotice) -> Option<Description> {
    Some(match n {
        ServerNotice::Dropped(d) => ("dropped", d.sender, format!("message {d}")),
        ServerNotice::Event(e) => {
            let (kind, device, text) = describe_event(e);
            (kind, Some(device), text)
        }
        ServerNotice::ConfidentialData { device, data, .. } => (
            "data",
            Some(*device),
            format!("data (confidential) {}", data_text(data)),
        ),
        ServerNotice::Confidential { device, notice } => {
            let text = match notice {
                ConfNotice::Established {
                    rekey,
                    cache_matched,
                    ..
                } => format!(
                    "confidential session {}{}",
                    if *rekey { "rekeyed" } else { "established" },
                    if *cache_matched {
                        ", key continuity held"
                    } else {
                        ""
                    }
                ),
                ConfNotice::Failed { reason } => format!("confidential handshake failed: {reason}"),
                ConfNotice::Refused { reason } => {
                    format!("message refused by the confidential layer: {reason}")
                }
            };
            ("confidential", Some(*device), text)
        }
        ServerNotice::RateLimited { device, refused } => (
            "rate_limited",
            Some(*device),
            format!("over its rate limit: {refused} messages dropped in this run"),
        ),
        ServerNotice::Published { .. } => return None,
    })
}

fn describe_event(e: &ServerEvent) -> (&'static str, DeviceId, String) {
    match e {
        ServerEvent::Response {
            device,
            token,
            kind,
            status,
        } => {
            let what = match kind {
                CommandKind::Command(t) => t.to_string(),
                CommandKind::Update { .. } => "update".into(),
                CommandKind::Activate { .. } => "activate".into(),
                CommandKind::Join => "join command".into(),
                CommandKind::Observation { joining } => format!("observation of {joining}"),
                CommandKind::Terminate => "terminate".into(),
                CommandKind::Deregister => "deregister".into(),
            };
            (
                "response",
                *device,
                format!(
                    "answered {what} {}: {}",
                    token_hex(token),
                    status_name(status.code())
                ),
            )
        }
        ServerEvent::Data { device, data, .. } => {
            ("data", *device, format!("data {}", data_text(data)))
        }
        ServerEvent::Generic { device, data, .. } => (
            "generic",
            *device,
            format!("generic message of {} bytes", data.len()),
        ),
        ServerEvent::StatusChanged { device, status } => (
            "status",
            *device,
            format!("status is now {}", status.name()),
        ),
        ServerEvent::JoinRequested { device } => (
            "join_requested",
            *device,
            "asks to join: accept or refuse it".into(),
        ),
        ServerEvent::HumanJoinPending { device, words } => (
            "join_requested",
            *device,
            format!(
                "asks to join (human-moderated); the device shows {} words",
                words.len()
            ),
        ),
        ServerEvent::ObservationStarted { device, observer } => (
            "join_requested",
            *device,
            format!("asks to join, observed by {observer}"),
        ),
        ServerEvent::Joined { device, method } => (
            "joined",
            *device,
            format!("joined ({})", method_name(*method)),
        ),
        ServerEvent::JoinRefused {
            device,
            method,
            reason,
        } => (
            "join_refused",
            *device,
            format!("join refused ({}): {reason:?}", method_name(*method)),
        ),
        ServerEvent::Resigned { device } => ("resigned", *device, "resigned".into()),
        ServerEvent::DeregisterRequested { device } => (
            "deregistered",
            *device,
            "asked to be deregistered; revoked".into(),
        ),
        ServerEvent::CommandExpired { device, token } => (
            "expired",
            *device,
            format!("no response to {} in time", token_hex(token)),
        ),
    }
}

/// `id = value`, long values cut.
fn data_text(d: &Data) -> String {
    let mut s = format!("{} = ", cut(&d.id));
    let _ = match &d.value {
        Value::U8(v) => write!(s, "{v}"),
        Value::U16(v) => write!(s, "{v}"),
        Value::U32(v) => write!(s, "{v}"),
        Value::U64(v) => write!(s, "{v}"),
        Value::I32(v) => write!(s, "{v}"),
        Value::I64(v) => write!(s, "{v}"),
        Value::F32(v) => write!(s, "{v}"),
        Value::F64(v) => write!(s, "{v}"),
        Value::Bool(v) => write!(s, "{v}"),
        Value::Text(t) => write!(s, "{:?}", cut(t)),
        Value::Bytes(b) => {
            let shown: String = b
                .iter()
                .take(VALUE_SHOWN / 2)
                .map(|x| format!("{x:02x}"))
                .collect();
            let more = if b.len() > VALUE_SHOWN / 2 { "…" } else { "" };
            write!(s, "{} bytes {shown}{more}", b.len())
        }
    };
    s
}

fn cut(t: &str) -> String {
    if t.chars().count() <= VALUE_SHOWN {
        return t.to_string();
    }
    let mut s: String = t.chars().take(VALUE_SHOWN).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DropReason, Dropped, JoinMethod};

    fn dev(n: u8) -> DeviceId {
        DeviceId::from_hex(&format!("{n:016x}")).unwrap()
    }

    fn joined(n: u8) -> ServerNotice {
        ServerNotice::Event(ServerEvent::Joined {
            device: dev(n),
            method: JoinMethod::Human,
        })
    }

    #[test]
    fn events_are_numbered_and_read_after_a_number() {
        let mut log = EventLog::new(7);
        for n in 1..=3 {
            log.push(describe(&joined(n)).unwrap(), 100 + u64::from(n));
        }
        let all = log.after(0, 10);
        assert_eq!(all.missed, 0);
        assert_eq!(all.next, 3);
        assert_eq!(
            all.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(all.events[1].device.as_deref(), Some("0000000000000002"));
        assert_eq!(all.events[1].kind, "joined");
        assert_eq!(all.events[1].text, "joined (human)");
        assert_eq!(all.events[1].time, 102);
        let later = log.after(2, 10);
        assert_eq!(later.events.len(), 1);
        assert_eq!(later.events[0].seq, 3);
        // Nothing new: the same number back.
        let none = log.after(3, 10);
        assert!(none.events.is_empty());
        assert_eq!(none.next, 3);
        // At most `max` at once, and `next` lets the reader go on.
        let two = log.after(0, 2);
        assert_eq!(two.next, 2);
        assert_eq!(log.after(two.next, 2).events[0].seq, 3);
    }

    #[test]
    fn the_log_is_bounded_and_says_what_a_slow_reader_missed() {
        let mut log = EventLog::new(7);
        let n = EVENT_LOG_LEN as u64 + 25;
        for i in 0..n {
            log.push(describe(&joined((i % 200) as u8)).unwrap(), i);
        }
        assert_eq!(log.items.len(), EVENT_LOG_LEN);
        let b = log.after(0, MAX_EVENTS_PER_CALL);
        assert_eq!(b.missed, 25);
        assert_eq!(b.events[0].seq, 26);
        assert_eq!(b.events.len(), MAX_EVENTS_PER_CALL);
        assert_eq!(log.after(30, 1).missed, 0);
        // A reader ahead of the log (its number is from an earlier run) starts again.
        let ahead = log.after(n + 500, 10);
        assert_eq!(ahead.events[0].seq, 26);
        assert_eq!(ahead.missed, 25);
        assert_eq!(ahead.run, 7);
    }

    #[test]
    fn published_messages_are_not_logged_and_drops_name_their_reason() {
        let mut log = EventLog::new(7);
        assert!(describe(&ServerNotice::Published {
            device: dev(1),
            token: crate::wire::Token::new(&[1, 2]).unwrap(),
            bytes: bytes::Bytes::from_static(b"x"),
        })
        .is_none());
        let dropped = describe(&ServerNotice::Dropped(Dropped {
            reason: DropReason::Revoked,
            sender: Some(dev(9)),
            msg_type: None,
        }));
        log.push(dropped.unwrap(), 2);
        let e = &log.after(0, 10).events[0];
        assert_eq!(e.kind, "dropped");
        assert!(e.text.contains("revoked"), "{}", e.text);
        assert_eq!(e.device.as_deref(), Some("0000000000000009"));
    }

    #[test]
    fn long_values_are_cut() {
        let d = Data {
            id: "t".into(),
            value: Value::Text("x".repeat(10_000)),
        };
        let s = data_text(&d);
        assert!(s.chars().count() < VALUE_SHOWN + 20, "{}", s.len());
        assert!(s.ends_with("…\""));
        let b = Data {
            id: "b".into(),
            value: Value::Bytes(vec![0xab; 1000]),
        };
        let s = data_text(&b);
        assert!(s.starts_with("b = 1000 bytes abab"), "{s}");
        assert!(s.ends_with('…'));
    }
}
