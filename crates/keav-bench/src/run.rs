//! The runner behind `keav bench`: runs the selected scenarios in order, reports progress,
//! stops cleanly when asked to, and always returns what it measured.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::options::{Options, Scenario};
use crate::report::{Meta, Report};
use crate::{scenario, BenchError};

/// Where a run reports its progress (the CLI draws a progress bar; tests count calls).
pub trait Progress: Sync {
    /// A new stage begins with `total` steps (e.g. handshakes to make).
    fn stage(&self, name: &str, total: u64);
    /// `n` steps of the current stage are done.
    fn advance(&self, n: u64);
    /// A one-line remark (shown above the bar).
    fn note(&self, msg: &str);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn note(&self, _: &str) {}
}

/// What a scenario gets: the options, a place for its rows, progress and the stop flag.
pub struct Ctx<'a> {
    /// The run's options.
    pub opts: &'a Options,
    /// Rows go here as soon as they are measured.
    pub report: &'a mut Report,
    /// Progress sink.
    pub progress: &'a dyn Progress,
    /// Set (by Ctrl-C) to stop the run; checked between measurements.
    pub cancel: &'a AtomicBool,
}

impl Ctx<'_> {
    /// `Err(BenchError::Cancelled)` once a stop was requested: call between measurements
    /// and propagate with `?`.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(BenchError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Whether a stop was requested.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Runs the scenarios of `opts`. Never loses results: a scenario that fails is noted in the
/// report and the run goes on; a stop request ends the run with [`Report::partial`] set.
/// The caller writes the report ([`Report::write`]).
pub fn run(
    opts: &Options,
    command: &str,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Report, BenchError> {
    opts.validate()?;
    let started = Instant::now();
    let mut report = Report {
        meta: meta(command),
        options: Some(opts.clone()),
        ..Report::default()
    };
    let mut failed = Vec::new();
    for s in Scenario::ALL.into_iter().filter(|s| opts.has(*s)) {
        let mut ctx = Ctx {
            opts,
            report: &mut report,
            progress,
            cancel,
        };
        // A scenario that panics (a bug, or a dependency's unimplemented stub) fails like one
        // that returns an error: the rows it pushed so far and the other scenarios are kept.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match s {
            Scenario::Latency => scenario::latency::run(&mut ctx),
            Scenario::Cpu => scenario::cpu::run(&mut ctx),
            Scenario::Records => scenario::datapath::run_records(&mut ctx),
            Scenario::Throughput => scenario::datapath::run_throughput(&mut ctx),
            Scenario::Memory => scenario::memory::run(&mut ctx),
            Scenario::Wire => scenario::wire::run(&mut ctx),
            Scenario::Broker => scenario::broker::run(&mut ctx),
            Scenario::C2 => scenario::c2::run(&mut ctx),
        }))
        .unwrap_or_else(|p| Err(BenchError::Report(panic_message(p.as_ref()))));
        match r {
            Ok(()) => {}
            Err(BenchError::Cancelled) => {
                report.partial = Some(format!("interrupted during the {s} scenario"));
                break;
            }
            Err(e) => {
                progress.note(&format!("{s} failed: {e}"));
                report.notes.push(format!("The {s} scenario failed: {e}"));
                failed.push(s.name());
            }
        }
        if cancel.load(Ordering::Relaxed) && report.partial.is_none() {
            report.partial = Some(format!("interrupted after the {s} scenario"));
            break;
        }
    }
    if report.partial.is_none() && !failed.is_empty() {
        report.partial = Some(format!("failed scenarios: {}", failed.join(", ")));
    }
    report.meta.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What a caught panic said, for the report.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("panicked: {what}")
}

fn meta(command: &str) -> Meta {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| std::env::consts::OS.to_string());
    Meta {
        command: command.to_string(),
        started: rfc3339_utc(SystemTime::now()),
        elapsed_secs: 0.0,
        version: env!("CARGO_PKG_VERSION").to_string(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        aead_backend: keav_proto::record::AEAD_BACKEND.to_string(),
        release_build: !cfg!(debug_assertions),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time after 1970.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn panics_become_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "panicked: boom 7");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "panicked: static");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_398_093);
        assert_eq!(rfc3339_utc(t), "2026-11-23T01:41:33Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_utc(leap), "2000-02-29T00:00:00Z");
    }
}
