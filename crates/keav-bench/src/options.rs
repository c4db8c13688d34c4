//! What a `keav bench` run measures: scenarios, repetitions, link models; parsed and checked
//! up front so that a bad flag fails before anything is measured.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::BenchError;

/// One part of the benchmark report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The patent's table: provisioning latency per mode and session over a link model, with
    /// and without the equality test, beside TLS 1.3 (full + OCSP staple, resumed) and Noise XX.
    Latency,
    /// CPU per handshake on each side and server handshakes per second on one core.
    Cpu,
    /// Record seal + open for 64 B, 1 KiB and 16 KiB beside rustls and snow.
    Records,
    /// One TCP channel's throughput on loopback.
    Throughput,
    /// Resident memory per established idle session.
    Memory,
    /// Bytes on the wire per handshake, per mode, beside TLS and Noise.
    Wire,
    /// Messages per second end to end through an MQTT broker and a NATS server beside plain
    /// clients on the same broker, and the mailbox drain rate after an offline period.
    Broker,
    /// C2 (issue 6): signature cost per command (Ed25519 vs RSA-2048) and signed commands
    /// per second from a C2 server to a fleet through an MQTT broker, beside plaintext.
    C2,
}

impl Scenario {
    /// All scenarios in the order a run executes them.
    pub const ALL: [Scenario; 8] = [
        Scenario::Wire,
        Scenario::Cpu,
        Scenario::Records,
        Scenario::Throughput,
        Scenario::Memory,
        Scenario::Latency,
        Scenario::Broker,
        Scenario::C2,
    ];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Latency => "latency",
            Scenario::Cpu => "cpu",
            Scenario::Records => "records",
            Scenario::Throughput => "throughput",
            Scenario::Memory => "memory",
            Scenario::Wire => "wire",
            Scenario::Broker => "broker",
            Scenario::C2 => "c2",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s.trim())
            .ok_or_else(|| {
                BenchError::InvalidOption(format!(
                    "unknown scenario {s:?}; known: {}",
                    Scenario::ALL.map(Scenario::name).join(", ")
                ))
            })
    }
}

/// Parses a comma-separated scenario list (`all` selects every scenario).
pub fn parse_scenarios(s: &str) -> Result<BTreeSet<Scenario>, BenchError> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" {
            out.extend(Scenario::ALL);
        } else {
            out.insert(part.parse()?);
        }
    }
    if out.is_empty() {
        return Err(BenchError::InvalidOption("no scenario selected".into()));
    }
    Ok(out)
}

/// The link between the two devices of the latency scenario: every byte is delayed by
/// `one_way` plus a uniformly drawn jitter in `[-jitter, +jitter]` (order is preserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LinkModel {
    /// One-way delay.
    #[serde(with = "duration_us")]
    pub one_way: Duration,
    /// Maximum deviation from `one_way`, either way.
    #[serde(with = "duration_us")]
    pub jitter: Duration,
}

/// Longest one-way delay accepted (a latency run makes hundreds of handshakes).
pub const MAX_ONE_WAY: Duration = Duration::from_secs(2);

impl LinkModel {
    /// The patent's internet path: 70 ms one way, no jitter.
    pub const INTERNET: LinkModel = LinkModel {
        one_way: Duration::from_millis(70),
        jitter: Duration::ZERO,
    };
    /// Loopback as it is.
    pub const LOCAL: LinkModel = LinkModel {
        one_way: Duration::ZERO,
        jitter: Duration::ZERO,
    };

    /// Short name: `70ms`, `70ms/5ms`, `0ms`.
    pub fn name(&self) -> String {
        let ms = |d: Duration| {
            let us = d.as_micros();
            if us % 1000 == 0 {
                format!("{}ms", us / 1000)
            } else {
                format!("{:.1}ms", us as f64 / 1000.0)
            }
        };
        if self.jitter.is_zero() {
            ms(self.one_way)
        } else {
            format!("{}/{}", ms(self.one_way), ms(self.jitter))
        }
    }

    /// Round-trip time of the model (twice the one-way delay).
    pub fn rtt(&self) -> Duration {
        self.one_way * 2
    }
}

impl fmt::Display for LinkModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

fn parse_duration(s: &str) -> Result<Duration, BenchError> {
    let s = s.trim();
    let bad = || {
        BenchError::InvalidOption(format!(
            "bad duration {s:?}: write a number with ms or us, e.g. 70ms"
        ))
    };
    let (num, scale_us) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    let us = v * scale_us;
    if us > MAX_ONE_WAY.as_micros() as f64 {
        return Err(BenchError::InvalidOption(format!(
            "{s} is longer than the {} ms limit",
            MAX_ONE_WAY.as_millis()
        )));
    }
    Ok(Duration::from_micros(us.round() as u64))
}

impl FromStr for LinkModel {
    type Err = BenchError;
    /// `DELAY` or `DELAY/JITTER`, e.g. `70ms`, `70ms/5ms`, `0ms`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (d, j) = match s.split_once('/') {
            Some((d, j)) => (parse_duration(d)?, parse_duration(j)?),
            None => (parse_duration(s)?, Duration::ZERO),
        };
        if j > d {
            return Err(BenchError::InvalidOption(format!(
                "link {s:?}: jitter larger than the delay would need negative delays"
            )));
        }
        Ok(LinkModel {
            one_way: d,
            jitter: j,
        })
    }
}

/// Parses a comma-separated list of link models.
pub fn parse_links(s: &str) -> Result<Vec<LinkModel>, BenchError> {
    let mut out: Vec<LinkModel> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let l: LinkModel = part.parse()?;
        if !out.contains(&l) {
            out.push(l);
        }
    }
    if out.is_empty() {
        return Err(BenchError::InvalidOption("no link model given".into()));
    }
    Ok(out)
}

/// Everything a run needs to know. Build with [`Options::default`], change fields, then call
/// [`Options::validate`] (the runner calls it too).
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    /// Scenarios to run.
    pub scenarios: BTreeSet<Scenario>,
    /// Repetitions of each latency series (the patent used 10).
    pub reps: u32,
    /// Sessions per latency series (1..=sessions; the patent used 10).
    pub sessions: u32,
    /// Link models of the latency scenario.
    pub links: Vec<LinkModel>,
    /// N of `normal` mode: verification on sessions 1, 1+N, ...
    pub verify_every: u32,
    /// Idle sessions held by the memory scenario.
    pub memory_sessions: u32,
    /// Messages per measurement of the broker scenario (each size, each broker, and the
    /// mailbox drain).
    pub broker_messages: u32,
    /// MQTT broker `host:port` of the broker scenario; `None`: an embedded broker (rumqttd)
    /// on a free loopback port.
    pub mqtt: Option<String>,
    /// NATS server `host:port` of the broker scenario; `None`: NATS is skipped (noted in the
    /// report).
    pub nats: Option<String>,
    /// Simulated devices of the C2 fleet measurement (each its own MQTT connection).
    pub c2_devices: u32,
    /// Fewer iterations in the CPU, record and throughput scenarios (a smoke run).
    pub quick: bool,
    /// Where the report goes.
    pub out_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            scenarios: Scenario::ALL.into_iter().collect(),
            reps: 10,
            sessions: 10,
            links: vec![LinkModel::INTERNET, LinkModel::LOCAL],
            verify_every: 10,
            memory_sessions: 100_000,
            broker_messages: DEFAULT_BROKER_MESSAGES,
            mqtt: None,
            nats: None,
            c2_devices: DEFAULT_C2_DEVICES,
            quick: false,
            out_dir: PathBuf::from("bench-report"),
        }
    }
}

/// Upper bounds that keep every run bounded in count and time.
pub const MAX_REPS: u32 = 1000;
/// See [`MAX_REPS`].
pub const MAX_SESSIONS: u32 = 1000;
/// See [`MAX_REPS`].
pub const MAX_MEMORY_SESSIONS: u32 = 2_000_000;
/// See [`MAX_REPS`].
pub const MAX_BROKER_MESSAGES: u32 = 1_000_000;
/// Messages per broker measurement by default.
pub const DEFAULT_BROKER_MESSAGES: u32 = 20_000;
/// Messages per broker measurement with `--quick`.
pub const QUICK_BROKER_MESSAGES: u32 = 2_000;

/// Devices of the C2 fleet measurement by default.
pub const DEFAULT_C2_DEVICES: u32 = 200;
/// Devices of the C2 fleet measurement with `--quick`.
pub const QUICK_C2_DEVICES: u32 = 100;
/// See [`MAX_REPS`].
pub const MAX_C2_DEVICES: u32 = 1000;

/// Checks a broker address: `HOST:PORT` with an optional `scheme://` prefix (`mqtt://`,
/// `nats://`); returns `HOST:PORT`. IPv6 hosts in brackets: `[::1]:1883`.
pub fn parse_broker_addr(s: &str, scheme: &str) -> Result<String, BenchError> {
    let t = s.trim();
    let bad = || {
        BenchError::InvalidOption(format!(
            "bad broker address {s:?}: expected HOST:PORT or {scheme}://HOST:PORT"
        ))
    };
    let rest = t.strip_prefix(&format!("{scheme}://")).unwrap_or(t);
    if rest.contains("://") || rest.len() > 255 {
        return Err(bad());
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 && host_ok => Ok(rest.to_string()),
        _ => Err(bad()),
    }
}

impl Options {
    /// Whether `s` is selected.
    pub fn has(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    /// Rejects impossible values and combinations with a message naming the flag.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::InvalidOption(m));
        if self.scenarios.is_empty() {
            return bad("no scenario selected".into());
        }
        if !(1..=MAX_REPS).contains(&self.reps) {
            return bad(format!("--reps must be between 1 and {MAX_REPS}"));
        }
        if !(1..=MAX_SESSIONS).contains(&self.sessions) {
            return bad(format!("--sessions must be between 1 and {MAX_SESSIONS}"));
        }
        if self.verify_every == 0 || self.verify_every > 1_000_000 {
            return bad("--verify-every must be between 1 and 1000000".into());
        }
        if self.links.is_empty() {
            return bad("no link model given".into());
        }
        if !(1..=MAX_MEMORY_SESSIONS).contains(&self.memory_sessions) {
            return bad(format!(
                "--memory-sessions must be between 1 and {MAX_MEMORY_SESSIONS}"
            ));
        }
        if !(1..=MAX_BROKER_MESSAGES).contains(&self.broker_messages) {
            return bad(format!(
                "--broker-messages must be between 1 and {MAX_BROKER_MESSAGES}"
            ));
        }
        if !(1..=MAX_C2_DEVICES).contains(&self.c2_devices) {
            return bad(format!(
                "--c2-devices must be between 1 and {MAX_C2_DEVICES}"
            ));
        }
        for (flag, scheme, v) in [
            ("--mqtt", "mqtt", &self.mqtt),
            ("--nats", "nats", &self.nats),
        ] {
            if let Some(a) = v {
                if let Err(e) = parse_broker_addr(a, scheme) {
                    return bad(format!("{flag}: {e}"));
                }
            }
        }
        if self.out_dir.exists() && !self.out_dir.is_dir() {
            return bad(format!(
                "--out {} exists and is not a directory",
                self.out_dir.display()
            ));
        }
        Ok(())
    }
}

mod duration_us {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_and_reject_unknown() {
        let s = parse_scenarios("cpu, latency").unwrap();
        assert_eq!(
            s.into_iter().collect::<Vec<_>>(),
            vec![Scenario::Latency, Scenario::Cpu]
        );
        assert_eq!(parse_scenarios("all").unwrap().len(), Scenario::ALL.len());
        let e = parse_scenarios("cpu,latncy").unwrap_err().to_string();
        assert!(e.contains("latncy") && e.contains("known:"), "{e}");
        assert!(parse_scenarios(" , ").is_err());
    }

    #[test]
    fn links_parse() {
        let l = parse_links("70ms,0ms,70ms/5ms,1.5ms").unwrap();
        assert_eq!(l[0], LinkModel::INTERNET);
        assert_eq!(l[1], LinkModel::LOCAL);
        assert_eq!(l[2].jitter, Duration::from_millis(5));
        assert_eq!(l[3].one_way, Duration::from_micros(1500));
        assert_eq!(l[2].name(), "70ms/5ms");
        assert_eq!(l[3].name(), "1.5ms");
        for bad in ["70", "-5ms", "5ms/10ms", "3s", "nanms", "70ms/"] {
            assert!(parse_links(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn broker_addresses() {
        assert_eq!(
            parse_broker_addr("127.0.0.1:1883", "mqtt").unwrap(),
            "127.0.0.1:1883"
        );
        assert_eq!(
            parse_broker_addr(" nats://localhost:4222 ", "nats").unwrap(),
            "localhost:4222"
        );
        assert_eq!(
            parse_broker_addr("[::1]:1883", "mqtt").unwrap(),
            "[::1]:1883"
        );
        for bad in [
            "",
            "localhost",
            ":1883",
            "host:0",
            "host:65536",
            "host:port",
            "nats://h:4222",
            "mqtt://mqtt://h:1",
            "[::1:1883",
            "[zz]:1883",
            "a b:1883",
            "h/x:1883",
        ] {
            assert!(parse_broker_addr(bad, "mqtt").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn validate_rejects_impossible_values() {
        let ok = Options::default();
        ok.validate().unwrap();
        let mut o = ok.clone();
        o.reps = 0;
        assert!(o.validate().unwrap_err().to_string().contains("--reps"));
        let mut o = ok.clone();
        o.sessions = 0;
        assert!(o.validate().is_err());
        let mut o = ok.clone();
        o.verify_every = 0;
        assert!(o.validate().is_err());
        let mut o = ok.clone();
        o.broker_messages = 0;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--broker-messages"));
        let mut o = ok.clone();
        o.nats = Some("localhost".into());
        assert!(o.validate().unwrap_err().to_string().contains("--nats"));
        let mut o = ok.clone();
        o.mqtt = Some("127.0.0.1:1883".into());
        o.nats = Some("nats://127.0.0.1:4222".into());
        o.validate().unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut o = ok;
        o.out_dir = f.path().to_path_buf();
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }
}
