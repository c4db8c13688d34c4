//! The `memory` scenario: resident memory per established idle session.
//!
//! Each subject is measured in a child process (the current executable, started with
//! [`WORKER_ENV`] = `SUBJECT:COUNT`), so that what the parent allocated earlier does not blur
//! the numbers. The child calls [`maybe_run_worker`] first thing in `main`, measures with
//! [`measure`] and prints the row as one JSON line. An executable that does not answer the
//! protocol (a test binary) is detected and the subject is measured in-process instead,
//! which the row's `what` says.
//!
//! [`measure`] reads `VmRSS` from `/proc/self/status` (Linux only), builds `COUNT` sessions
//! (after a warm-up that sets up everything shared by all sessions), keeps them alive, reads
//! `VmRSS` again and divides the difference by the sessions held.

use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use keav_proto::handshake::Role;
use keav_proto::record::{self, Aead, Opener, RatchetPolicy, Sealer};
use keav_proto::secret::Secret32;
use rand_core::{OsRng, RngCore};

use crate::report::MemoryRow;
use crate::run::Ctx;
use crate::BenchError;

/// Environment variable that turns the executable into a memory worker: `SUBJECT:COUNT`.
pub const WORKER_ENV: &str = "KEAV_BENCH_MEMORY_WORKER";

/// keav with the AEAD this machine prefers ([`Aead::local_preference`]).
pub const KEAV_SESSION: &str = "keav session";
/// keav with AES-256-GCM.
pub const KEAV_SESSION_AES: &str = "keav session aes-256-gcm";
/// keav with ChaCha20-Poly1305.
pub const KEAV_SESSION_CHACHA: &str = "keav session chacha20-poly1305";
/// keav with the preferred AEAD, idle: both directions compacted
/// ([`Sealer::compact`], [`Opener::compact`]), as a server holding many quiet channels keeps
/// them.
pub const KEAV_SESSION_IDLE: &str = "keav session, idle (compacted)";
/// rustls' server side after a full TLS 1.3 handshake.
pub const RUSTLS_SERVER: &str = "rustls ServerConnection (idle, after handshake)";
/// snow's responder transport state after Noise XX.
pub const SNOW_TRANSPORT: &str = "snow TransportState";

/// The subjects [`measure`] knows.
pub const SUBJECTS: [&str; 6] = [
    KEAV_SESSION,
    KEAV_SESSION_IDLE,
    KEAV_SESSION_AES,
    KEAV_SESSION_CHACHA,
    RUSTLS_SERVER,
    SNOW_TRANSPORT,
];

/// Most sessions held for a peer protocol (each needs a full handshake); the per-session
/// figure is the same division, over fewer sessions.
pub const MAX_PEER_SESSIONS: u32 = 10_000;

/// Sessions of a quick run.
pub const QUICK_SESSIONS: u32 = 2000;

/// Marker at the start of the worker's result line (anything else on stdout is ignored).
const LINE_PREFIX: &str = "keav-bench-memory ";

/// If [`WORKER_ENV`] is set, measures the subject it names, prints one line
/// (`keav-bench-memory {json}`) on stdout and returns the exit code; `None` otherwise. Call
/// it first thing in `main`.
pub fn maybe_run_worker() -> Option<ExitCode> {
    let spec = std::env::var(WORKER_ENV).ok()?;
    Some(match worker_line(&spec) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("memory worker: {e}");
            ExitCode::FAILURE
        }
    })
}

/// What the worker prints for `spec` (`SUBJECT:COUNT`): the measured row as a result line.
pub fn worker_line(spec: &str) -> Result<String, BenchError> {
    let (subject, count) = spec
        .rsplit_once(':')
        .ok_or_else(|| BenchError::InvalidOption(format!("memory worker: bad spec {spec:?}")))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| BenchError::InvalidOption(format!("memory worker: bad count in {spec:?}")))?;
    let row = measure(subject, count)?;
    let json = serde_json::to_string(&row)
        .map_err(|e| BenchError::Report(format!("memory worker: {e}")))?;
    Ok(format!("{LINE_PREFIX}{json}"))
}

/// Parses the worker's output: the first line starting with the result marker, as a
/// [`MemoryRow`] whose fields are all present and sane.
pub fn parse_worker_output(out: &str) -> Result<MemoryRow, BenchError> {
    let bad = |why: &str| BenchError::Report(format!("memory worker output: {why}"));
    let json = out
        .lines()
        .find_map(|l| l.strip_prefix(LINE_PREFIX))
        .ok_or_else(|| bad("no result line"))?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| bad(&format!("missing {k}")))
    };
    let u = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad(&format!("missing {k}")))
    };
    let row = MemoryRow {
        subject: s("subject")?,
        what: s("what")?,
        sessions: u("sessions")?,
        rss_before_kib: u("rss_before_kib")?,
        rss_after_kib: u("rss_after_kib")?,
        bytes_per_session: v
            .get("bytes_per_session")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| bad("missing bytes_per_session"))?,
    };
    if row.sessions == 0 || !row.bytes_per_session.is_finite() {
        return Err(bad("no sessions or a non-finite size"));
    }
    Ok(row)
}

/// Resident set size of this process, KiB (`VmRSS` of `/proc/self/status`).
pub fn rss_kib() -> Result<u64, BenchError> {
    if !cfg!(target_os = "linux") {
        return Err(BenchError::Report(
            "memory: resident set size is read from /proc/self/status, which only Linux has".into(),
        ));
    }
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| BenchError::Report("memory: no VmRSS in /proc/self/status".into()))
}

/// Sessions actually held for `subject` when `count` are asked for (peers are capped at
/// [`MAX_PEER_SESSIONS`]).
pub fn sessions_for(subject: &str, count: u32) -> u32 {
    if subject.starts_with("keav") {
        count
    } else {
        count.min(MAX_PEER_SESSIONS)
    }
}

/// The record-layer state a keav channel keeps for one established session: both
/// directions, built exactly as `keav_net::session::Channel` builds them
/// (`record::channel_from_parts` via `record::channel`, stream transport: in-order opener).
struct KeavSession {
    _sealer: Sealer,
    _opener: Opener,
}

fn keav_session(aead: Aead, kdf_context_len: usize, idle: bool) -> KeavSession {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    let mut ctx = vec![0u8; kdf_context_len];
    OsRng.fill_bytes(&mut ctx);
    let (mut sealer, mut opener) = record::channel_from_parts(
        &Secret32::new(key),
        &ctx,
        Role::Responder,
        aead,
        RatchetPolicy::default(),
        0,
    );
    opener.require_in_order();
    if idle {
        sealer.compact();
        opener.compact();
    }
    KeavSession {
        _sealer: sealer,
        _opener: opener,
    }
}

/// Length of a real session's KDF_Context (one in-memory keav handshake).
fn kdf_context_len() -> Result<usize, BenchError> {
    let o = crate::run_keav_handshake(
        &crate::KeavSetup::first_session(keav_verify::Backend::CPace),
        &mut OsRng,
    )?;
    Ok(o.responder.kdf_context.len())
}

/// Builds `n` sessions with `make` after one warm-up session, and measures the resident set
/// before and after (sessions still held).
fn hold<T>(
    n: u32,
    mut make: impl FnMut() -> Result<T, BenchError>,
) -> Result<(u64, u64, u64), BenchError> {
    drop(make()?);
    let mut held: Vec<T> = Vec::new();
    let before = rss_kib()?;
    held.reserve_exact(n as usize);
    for _ in 0..n {
        held.push(make()?);
    }
    let after = rss_kib()?;
    let kept = held.len() as u64;
    drop(std::hint::black_box(held));
    Ok((before, after, kept))
}

fn row(subject: &str, what: String, (before, after, n): (u64, u64, u64)) -> MemoryRow {
    MemoryRow {
        subject: subject.to_string(),
        what,
        sessions: n,
        rss_before_kib: before,
        rss_after_kib: after,
        // Signed: memory freed before the measurement and reused by the sessions can make
        // it shrink (in a fresh worker process that does not happen).
        bytes_per_session: (after as f64 - before as f64) * 1024.0 / n.max(1) as f64,
    }
}

/// Measures `subject` (one of [`SUBJECTS`]) in this process: the growth of the resident set
/// while holding `count` sessions (peers: at most [`MAX_PEER_SESSIONS`]), per session.
/// Errors on an unknown subject, on `count == 0`, and off Linux.
pub fn measure(subject: &str, count: u32) -> Result<MemoryRow, BenchError> {
    if !SUBJECTS.contains(&subject) {
        return Err(BenchError::InvalidOption(format!(
            "unknown memory subject {subject:?}; known: {}",
            SUBJECTS.join(", ")
        )));
    }
    if count == 0 {
        return Err(BenchError::InvalidOption(
            "memory: at least one session".into(),
        ));
    }
    rss_kib()?;
    let n = sessions_for(subject, count);
    let keav_aead = match subject {
        KEAV_SESSION | KEAV_SESSION_IDLE => Some(Aead::local_preference()[0]),
        KEAV_SESSION_AES => Some(Aead::Aes256Gcm),
        KEAV_SESSION_CHACHA => Some(Aead::ChaCha20Poly1305),
        _ => None,
    };
    if let Some(aead) = keav_aead {
        let ctx_len = kdf_context_len()?;
        let idle = subject == KEAV_SESSION_IDLE;
        let m = hold(n, || Ok(keav_session(aead, ctx_len, idle)))?;
        let keys = if idle {
            "compacted: chain keys only, AEAD state dropped until the next record"
        } else {
            "expanded AEAD state of each direction's current epoch"
        };
        let what = format!(
            "keav-proto record state of both directions as a keav-net channel keeps it \
             (Sealer + in-order Opener from record::channel_from_parts, {} [{}], default \
             ratchet policy, {ctx_len}-byte KDF_Context shared by both, fresh random keys; \
             {keys}; replay window); not included: socket, frame buffers, PeerInfo, tokio \
             tasks",
            aead.name(),
            record::AEAD_BACKEND
        );
        return Ok(row(subject, what, m));
    }
    measure_peer(subject, n)
}

#[cfg(feature = "peers")]
fn measure_peer(subject: &str, n: u32) -> Result<MemoryRow, BenchError> {
    use crate::peers;
    match subject {
        RUSTLS_SERVER => {
            let pair = peers::TlsPair::new(peers::CertKind::Ed25519)?;
            let m = hold(n, || Ok(pair.full_handshake()?.server))?;
            Ok(row(
                subject,
                "rustls 0.23 (ring) ServerConnection after a full TLS 1.3 handshake \
                 (Ed25519 certificate, tickets sent), client dropped; shared configs not counted"
                    .into(),
                m,
            ))
        }
        SNOW_TRANSPORT => {
            let statics = peers::NoiseStatics::generate()?;
            let m = hold(n, || Ok(peers::noise_xx_handshake(&statics)?.responder))?;
            Ok(row(
                subject,
                format!(
                    "snow 0.10 responder TransportState after {} (initiator dropped)",
                    peers::NOISE_XX
                ),
                m,
            ))
        }
        _ => Err(BenchError::InvalidOption(format!(
            "unknown memory subject {subject:?}"
        ))),
    }
}

#[cfg(not(feature = "peers"))]
fn measure_peer(subject: &str, _n: u32) -> Result<MemoryRow, BenchError> {
    Err(BenchError::InvalidOption(format!(
        "memory subject {subject:?} needs the `peers` feature"
    )))
}

/// How the measurement of one subject went in a child process.
enum Child {
    Row(MemoryRow),
    /// The executable did not answer the worker protocol (why).
    NotAWorker(String),
}

/// Runs the current executable as a worker for `subject` and waits at most `timeout`.
fn run_child(subject: &str, count: u32, timeout: Duration) -> Result<Child, BenchError> {
    let exe = std::env::current_exe()?;
    // The arguments make a libtest harness run no test at all (so a test binary answers
    // quickly with nothing); a binary that calls `maybe_run_worker` first ignores them.
    let mut child = Command::new(exe)
        .args(["--exact", "keav-bench-memory-worker-probe"])
        .env(WORKER_ENV, format!("{subject}:{count}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = stdout.as_mut() {
            // At most 1 MiB: the result is one line.
            let _ = o.take(1 << 20).read_to_string(&mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(64 << 10).read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Report(format!(
                "memory: the worker for {subject:?} did not finish within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !out.contains(LINE_PREFIX) {
        // Not a worker (a test binary, or a binary that does not call `maybe_run_worker`),
        // or a worker that failed: either way there is no row; measure in-process.
        let why = if status.success() {
            "no result line".to_string()
        } else {
            format!(
                "{status}: {}",
                err.lines().last().unwrap_or("no message").trim()
            )
        };
        return Ok(Child::NotAWorker(why));
    }
    Ok(Child::Row(parse_worker_output(&out)?))
}

/// Runs the scenario, pushing rows into `ctx.report`.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    rss_kib()?;
    let count = if ctx.opts.quick {
        QUICK_SESSIONS.min(ctx.opts.memory_sessions.max(1))
    } else {
        ctx.opts.memory_sessions.max(1)
    };
    let preferred = Aead::local_preference()[0];
    let other = if preferred == Aead::Aes256Gcm {
        KEAV_SESSION_CHACHA
    } else {
        KEAV_SESSION_AES
    };
    let mut subjects = vec![KEAV_SESSION, KEAV_SESSION_IDLE, other];
    if cfg!(feature = "peers") {
        subjects.extend([RUSTLS_SERVER, SNOW_TRANSPORT]);
    }
    ctx.progress.stage("memory", subjects.len() as u64);
    // A worker never spawns workers: if this process was started as one but runs the
    // scenario anyway (its `main` does not call `maybe_run_worker`), stay in-process.
    let mut in_process = std::env::var_os(WORKER_ENV).is_some();
    if in_process {
        ctx.report
            .notes
            .push("memory: measured in-process (this process is itself a memory worker)".into());
    }
    for subject in subjects {
        ctx.check()?;
        let n = sessions_for(subject, count);
        // Generous: a peer handshake takes well under 10 ms even in a debug build.
        let timeout = Duration::from_secs(60) + Duration::from_millis(u64::from(n) * 10);
        let child = if in_process {
            Child::NotAWorker(String::new())
        } else {
            run_child(subject, n, timeout)?
        };
        let mut r = match child {
            Child::Row(r) => r,
            Child::NotAWorker(why) => {
                if !in_process {
                    in_process = true;
                    ctx.progress
                        .note("memory: this executable is no worker; measuring in-process");
                    ctx.report.notes.push(format!(
                        "memory: measured in-process (the executable did not answer the \
                         worker protocol: {why}), so earlier allocations may blur the numbers"
                    ));
                }
                let mut r = measure(subject, n)?;
                r.what.push_str(" [measured in-process]");
                r
            }
        };
        if r.subject != subject {
            return Err(BenchError::Report(format!(
                "memory: asked the worker for {subject:?}, got {:?}",
                r.subject
            )));
        }
        if subject == KEAV_SESSION {
            r.subject = format!("{KEAV_SESSION} ({}, preferred)", preferred.name());
        }
        ctx.report.memory.push(r);
        ctx.progress.advance(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_line_round_trips_through_the_parser() {
        let line = worker_line("keav session:300").unwrap();
        let r = parse_worker_output(&format!("noise before\n{line}\nafter\n")).unwrap();
        assert_eq!(r.subject, KEAV_SESSION);
        assert_eq!(r.sessions, 300);
        assert!(r.rss_after_kib >= r.rss_before_kib);
    }

    #[test]
    fn worker_spec_errors() {
        assert!(worker_line("keav session").is_err());
        assert!(worker_line("keav session:many").is_err());
        assert!(worker_line("nobody:10").is_err());
        assert!(worker_line("keav session:0").is_err());
    }
}
