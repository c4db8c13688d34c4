//! Memory per idle session: the in-process measurement, the worker protocol's parser and
//! the scenario's fallback when the executable (this test binary) is no worker.
#![cfg(feature = "peers")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;

use keav_bench::report::Report;
use keav_bench::scenario::memory::{
    self, measure, parse_worker_output, worker_line, KEAV_SESSION, RUSTLS_SERVER, SNOW_TRANSPORT,
};
use keav_bench::{Ctx, Options, Quiet, Scenario};

/// The resident set is per process: measurements run one at a time so that another test's
/// allocations do not land between a "before" and an "after".
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn keav_session_measurement_is_plausible() {
    let _serial = serial();
    let r = measure(KEAV_SESSION, 2000).unwrap();
    assert_eq!(r.subject, KEAV_SESSION);
    assert_eq!(r.sessions, 2000);
    assert!(r.rss_after_kib >= r.rss_before_kib);
    // Two directions of record state: certainly more than the 32-byte keys, certainly less
    // than 64 KiB each.
    assert!(
        r.bytes_per_session > 100.0 && r.bytes_per_session < 65_536.0,
        "{} bytes per session",
        r.bytes_per_session
    );
    assert!(r.what.contains("Sealer") && r.what.contains("Opener"));
}

#[test]
fn peer_subjects_are_capped_and_measured() {
    let _serial = serial();
    // A rustls server connection holds kilobytes: its growth shows even in a test process.
    let r = measure(RUSTLS_SERVER, 500).unwrap();
    assert_eq!(r.sessions, 500);
    assert!(r.rss_after_kib > r.rss_before_kib, "{r:?}");
    assert!(r.bytes_per_session > 0.0);
    // A snow transport is small enough to fit into memory the test process freed before
    // (that is why the scenario measures in a fresh child), so only the shape is checked.
    let r = measure(SNOW_TRANSPORT, 200).unwrap();
    assert_eq!(r.sessions, 200);
    assert!(r.bytes_per_session.is_finite());
    assert_eq!(memory::sessions_for(RUSTLS_SERVER, 100_000), 10_000);
    assert_eq!(memory::sessions_for(KEAV_SESSION, 100_000), 100_000);
}

#[test]
fn unknown_subject_and_zero_count_are_errors() {
    assert!(measure("openssl SSL", 10).is_err());
    assert!(measure("", 10).is_err());
    assert!(measure(KEAV_SESSION, 0).is_err());
}

#[test]
fn worker_parser_rejects_garbage() {
    for out in [
        "",
        "hello\n",
        "{\"subject\":\"x\"}\n",
        "keav-bench-memory not json\n",
        "keav-bench-memory {\"subject\":\"x\",\"what\":\"y\"}\n",
        "keav-bench-memory {\"subject\":\"x\",\"what\":\"y\",\"sessions\":0,\"rss_before_kib\":1,\
         \"rss_after_kib\":2,\"bytes_per_session\":1.0}\n",
        "keav-bench-memory {\"subject\":\"x\",\"what\":\"y\",\"sessions\":-3,\"rss_before_kib\":1,\
         \"rss_after_kib\":2,\"bytes_per_session\":1.0}\n",
    ] {
        assert!(parse_worker_output(out).is_err(), "accepted {out:?}");
    }
    let good = "keav-bench-memory {\"subject\":\"x\",\"what\":\"y\",\"sessions\":5,\
                \"rss_before_kib\":100,\"rss_after_kib\":110,\"bytes_per_session\":2048.0}";
    let r = parse_worker_output(good).unwrap();
    assert_eq!(
        (r.sessions, r.rss_before_kib, r.rss_after_kib),
        (5, 100, 110)
    );
    assert_eq!(r.bytes_per_session, 2048.0);
}

#[test]
fn worker_line_parses_back() {
    let _serial = serial();
    let line = worker_line(&format!("{KEAV_SESSION}:500")).unwrap();
    let r = parse_worker_output(&line).unwrap();
    assert_eq!(r.subject, KEAV_SESSION);
    assert_eq!(r.sessions, 500);
}

#[test]
fn scenario_falls_back_to_in_process_in_a_test_binary() {
    let _serial = serial();
    let opts = Options {
        scenarios: BTreeSet::from([Scenario::Memory]),
        quick: true,
        memory_sessions: 300,
        ..Options::default()
    };
    let mut report = Report::default();
    let cancel = AtomicBool::new(false);
    let mut ctx = Ctx {
        opts: &opts,
        report: &mut report,
        progress: &Quiet,
        cancel: &cancel,
    };
    memory::run(&mut ctx).unwrap();
    assert_eq!(report.memory.len(), 5);
    assert!(report.memory[0].subject.starts_with(KEAV_SESSION));
    assert!(report
        .memory
        .iter()
        .all(|r| r.sessions == 300 && r.what.ends_with("[measured in-process]")));
    assert!(report.notes.iter().any(|n| n.contains("in-process")));
}
