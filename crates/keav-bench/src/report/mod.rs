//! The results of a run: raw measurements as the scenarios produce them, written out as
//! `report.md` (tables and goals), `results.json` (everything, machine-readable) and PNG plots.
//!
//! Scenarios push rows as they measure them, so an interrupted run still has everything it
//! measured so far; [`Report::partial`] then says why it stopped.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::options::{LinkModel, Options};
use crate::BenchError;

pub mod c2;
mod markdown;
mod plots;
pub mod stats;

/// Who is measured: keav in a mode, or a peer protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    /// keav, `no-continuity` mode.
    KeavNoContinuity,
    /// keav, `normal` mode.
    KeavNormal,
    /// keav, `paranoid` mode.
    KeavParanoid,
    /// rustls TLS 1.3 full handshake with a stapled OCSP response (the patent's PKI baseline).
    TlsFullOcsp,
    /// rustls TLS 1.3 resumed handshake (session ticket, PSK with (EC)DHE).
    TlsResumed,
    /// snow Noise XX (25519, ChaChaPoly, BLAKE2s).
    NoiseXx,
}

impl Subject {
    /// The keav modes, in table order.
    pub const KEAV: [Subject; 3] = [
        Subject::KeavNoContinuity,
        Subject::KeavNormal,
        Subject::KeavParanoid,
    ];
    /// The peers, in table order.
    pub const PEERS: [Subject; 3] = [Subject::TlsFullOcsp, Subject::TlsResumed, Subject::NoiseXx];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Subject::KeavNoContinuity => "keav no-continuity",
            Subject::KeavNormal => "keav normal",
            Subject::KeavParanoid => "keav paranoid",
            Subject::TlsFullOcsp => "TLS 1.3 full + OCSP staple (rustls)",
            Subject::TlsResumed => "TLS 1.3 resumed (rustls)",
            Subject::NoiseXx => "Noise XX (snow)",
        }
    }

    /// Whether this is keav.
    pub fn is_keav(self) -> bool {
        Subject::KEAV.contains(&self)
    }
}

/// One provisioning (connect until the client holds an established channel) of the latency
/// scenario.
#[derive(Clone, Debug, Serialize)]
pub struct LatencySample {
    /// The link model it ran over.
    pub link: LinkModel,
    /// Protocol (and keav mode).
    pub subject: Subject,
    /// Session number in its series (1-based; the patent's "iteration").
    pub session: u32,
    /// Repetition of the series (0-based).
    pub rep: u32,
    /// The devices offered the equality test (keav: the "with" series). `false` for keav is
    /// the baseline series of the same devices with KEAV verification turned off (plain
    /// RFC 6189); always `true` for peers.
    pub with_verification: bool,
    /// What actually ran, e.g. `dh+cpace`, `dh`, `preshared`, `full`, `resumed`, `xx`.
    pub kind: String,
    /// Client-side latency: from starting to connect until the client holds the channel.
    pub latency_us: u64,
    /// One-way flights the client waited for (causal depth of the last message it needed,
    /// counted by the link proxy); round trips = flights / 2.
    pub flights: u32,
    /// Application bytes client → server during the handshake, as the proxy saw them.
    pub bytes_c2s: u64,
    /// Application bytes server → client during the handshake.
    pub bytes_s2c: u64,
}

/// CPU per handshake on each side (in-memory drivers, no I/O, no storage).
#[derive(Clone, Debug, Serialize)]
pub struct CpuRow {
    /// e.g. `keav dh+cpace`, `keav dh+smp`, `keav preshared`, `tls13 full (ed25519) + ocsp`.
    pub subject: String,
    /// Median CPU of the initiator (client) per handshake, µs.
    pub initiator_us: f64,
    /// Median CPU of the responder (server) per handshake, µs.
    pub responder_us: f64,
    /// Smallest and largest batch median of initiator + responder, µs (the spread).
    pub total_range_us: (f64, f64),
    /// Handshakes timed.
    pub iterations: u64,
    /// Server-side handshakes per second on one core (1 / responder CPU).
    pub server_hs_per_sec: f64,
}

/// Record seal + open (one record through both ends, in memory).
#[derive(Clone, Debug, Serialize)]
pub struct RecordRow {
    /// e.g. `keav aes-256-gcm`, `rustls aes-256-gcm`, `snow chachapoly`.
    pub subject: String,
    /// Payload bytes per record.
    pub size: usize,
    /// Median ns per record (seal + open).
    pub ns_median: f64,
    /// Fastest and slowest batch median, ns.
    pub ns_range: (f64, f64),
    /// Payload throughput at the median, MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// Bytes on the wire per record.
    pub wire_bytes: usize,
}

/// One stream's throughput over loopback TCP.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRow {
    /// e.g. `keav-net tcp channel`, `plain tcp`, `rustls over tcp`.
    pub subject: String,
    /// Median MB/s (10^6 bytes) over the runs.
    pub mb_per_s: f64,
    /// Slowest and fastest run, MB/s.
    pub range: (f64, f64),
    /// Bytes per run.
    pub bytes: u64,
    /// Runs.
    pub runs: u32,
}

/// Resident memory of many established idle sessions held in one process.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    /// e.g. `keav session (record state, both directions)`, `rustls ServerConnection`.
    pub subject: String,
    /// What one session holds, in words.
    pub what: String,
    /// Sessions held.
    pub sessions: u64,
    /// Resident set before creating them, KiB.
    pub rss_before_kib: u64,
    /// Resident set while holding them, KiB.
    pub rss_after_kib: u64,
    /// (after − before) / sessions.
    pub bytes_per_session: f64,
}

/// Bytes on the wire of one handshake.
#[derive(Clone, Debug, Serialize)]
pub struct WireRow {
    /// e.g. `keav normal`, `TLS 1.3 full + OCSP`.
    pub subject: String,
    /// What ran, e.g. `dh+cpace`, `preshared`, `dh+smp`.
    pub kind: String,
    /// Messages sent by the initiator / client.
    pub initiator_messages: u32,
    /// Bytes sent by the initiator / client (protocol messages as on the wire, no IP/TCP).
    pub initiator_bytes: u64,
    /// Messages sent by the responder / server.
    pub responder_messages: u32,
    /// Bytes sent by the responder / server.
    pub responder_bytes: u64,
    /// One-way flights until the client is done.
    pub flights: u32,
}

/// Messages per second through one broker: keav end to end — a live KEAV channel
/// ([`keav_net::session::Channel`] over the broker link) and durable messaging
/// ([`keav_net::messenger`]) — beside plain clients publishing the same messages on the same
/// broker. The `keav_*` fields are the durable run's.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerRow {
    /// The broker as the report names it, e.g. `MQTT (embedded rumqttd)`, `NATS 127.0.0.1:4222`.
    pub broker: String,
    /// `mqtt` or `nats`.
    pub carrier: String,
    /// Message body bytes (what the application sends).
    pub size: usize,
    /// Messages per measurement.
    pub messages: u64,
    /// keav live: messages received per second from the first `send` to the last message
    /// received (`None`: the run failed).
    pub live_msgs_per_s: Option<f64>,
    /// keav live: seconds from the first `send` to the last message received.
    pub live_secs: Option<f64>,
    /// keav live: messages that never arrived (the rate counts received messages only).
    pub live_lost: Option<u64>,
    /// keav live: records the receiver dropped (its link's queue full, or failing to open).
    pub live_dropped: Option<u64>,
    /// keav live: CPU seconds of the whole bench process during the run, if known.
    pub live_cpu_secs: Option<f64>,
    /// keav live / plain messages per second (`None`: not measured or no plain rate).
    pub live_ratio: Option<f64>,
    /// keav live with record coalescing off (`LinkOptions::coalesce_records = false`: one
    /// broker message per record, as the plaintext run publishes one per message): messages
    /// received per second (`None`: the run failed).
    pub live_single_msgs_per_s: Option<f64>,
    /// That rate / plain messages per second.
    pub live_single_ratio: Option<f64>,
    /// keav durable: messages per second from the first `send` to the last `recv`.
    pub keav_msgs_per_s: f64,
    /// keav durable: seconds from the first `send` to the last `recv`.
    pub keav_secs: f64,
    /// keav durable: payloads the sender put on the broker again (no end-to-end ack in time).
    pub keav_resent: u64,
    /// keav durable: payloads the receiver could not take on arrival (beyond its reorder
    /// window, or its receive queue full): kept in the channel's early-arrival stash while it
    /// has room, else left to the sender's resend.
    pub keav_deferred: u64,
    /// keav durable: messages taken from the early-arrival stash once the gap before them
    /// filled (no resend needed).
    pub keav_early: u64,
    /// keav durable: payloads the two devices' links dropped because a queue was full.
    pub keav_link_dropped: u64,
    /// keav durable: CPU seconds of the whole bench process during the measurement (both
    /// devices; the embedded broker too when it runs), if known.
    pub keav_cpu_secs: Option<f64>,
    /// keav durable with flow control by the application: bursts acknowledged end to end
    /// (`flush`) before the next, messages per second from the first `send` to the last
    /// `recv` (`None`: not measured).
    pub keav_paced_msgs_per_s: Option<f64>,
    /// Plain client: messages received per second, from the first publish to the last
    /// message received.
    pub plain_msgs_per_s: f64,
    /// Plain client: seconds from the first publish to the last message received.
    pub plain_secs: f64,
    /// Plain client: messages the subscriber never received (core NATS and a full broker
    /// queue may drop; nothing resends them). The rate counts received messages only.
    pub plain_lost: u64,
    /// keav durable / plain messages per second (`None` if the plain rate is zero).
    pub ratio: Option<f64>,
}

/// How fast a device that comes back online receives what its relay's mailbox held.
#[derive(Clone, Debug, Serialize)]
pub struct DrainRow {
    /// The broker the relay and the devices use (as in [`BrokerRow::broker`]).
    pub broker: String,
    /// `mqtt` or `nats`.
    pub carrier: String,
    /// Message body bytes.
    pub size: usize,
    /// Messages the relay held for the device when it came back.
    pub held: u64,
    /// Seconds the device was offline.
    pub offline_secs: f64,
    /// Messages per second from the device's messenger start to its last `recv`.
    pub drain_msgs_per_s: f64,
    /// Seconds from the messenger start to the last `recv`.
    pub drain_secs: f64,
    /// Milliseconds from the messenger start to the first `recv`.
    pub first_ms: f64,
}

/// Where and how the run happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Meta {
    /// The command line that produced the report.
    pub command: String,
    /// Start time, UTC, RFC 3339.
    pub started: String,
    /// Seconds the run took.
    pub elapsed_secs: f64,
    /// keav version.
    pub version: String,
    /// CPU model (from /proc/cpuinfo), logical CPUs.
    pub cpu: String,
    /// Logical CPUs available.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// keav's record AEAD backend in this build (ring or RustCrypto).
    pub aead_backend: String,
    /// Whether this is an optimised build.
    pub release_build: bool,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Run metadata.
    pub meta: Meta,
    /// The options of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<Options>,
    /// `Some(reason)` when the run stopped early (Ctrl-C, a failed scenario).
    pub partial: Option<String>,
    /// Latency samples.
    pub latency: Vec<LatencySample>,
    /// Handshake CPU.
    pub cpu: Vec<CpuRow>,
    /// Record seal + open.
    pub records: Vec<RecordRow>,
    /// Loopback TCP throughput.
    pub throughput: Vec<ThroughputRow>,
    /// Memory per idle session.
    pub memory: Vec<MemoryRow>,
    /// Bytes on the wire per handshake.
    pub wire: Vec<WireRow>,
    /// Messages per second through brokers, keav beside plain clients.
    pub broker: Vec<BrokerRow>,
    /// Mailbox drain after an offline period.
    pub drain: Vec<DrainRow>,
    /// C2 signature cost per operation and algorithm ([`c2::SigRow`]).
    pub c2_signatures: Vec<c2::SigRow>,
    /// C2 commands per second to a fleet through a broker, beside plaintext
    /// ([`c2::FleetRow`]).
    pub c2_fleet: Vec<c2::FleetRow>,
    /// Errors and remarks collected during the run (shown in the report).
    pub notes: Vec<String>,
}

impl Report {
    /// Writes `report.md`, `results.json` and the PNG plots into `dir` (created if missing).
    /// Returns the files written. A plot that cannot be drawn (e.g. no usable font) is
    /// reported in the Markdown instead of failing the whole report.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
        std::fs::create_dir_all(dir)?;
        let mut written = Vec::new();
        let (plots, plot_errors) = plots::draw_all(self, dir);
        written.extend(plots.iter().cloned());
        let md = markdown::render(self, &plots, &plot_errors);
        let md_path = dir.join("report.md");
        write_atomic(&md_path, md.as_bytes())?;
        written.push(md_path);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| BenchError::Report(format!("results.json: {e}")))?;
        let json_path = dir.join("results.json");
        write_atomic(&json_path, &json)?;
        written.push(json_path);
        Ok(written)
    }

    /// The short summary printed on stdout at the end of a run: goals and headline ratios.
    pub fn summary(&self) -> String {
        markdown::summary(self)
    }
}

/// Writes through a temporary file and a rename, so a crash leaves the old file or the new
/// one, never half of one.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), BenchError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
