//! The records and throughput scenarios end to end (quick plans; nothing timed is asserted).
#![cfg(feature = "peers")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;

use keav_bench::records::PAYLOAD_SIZES;
use keav_bench::report::Report;
use keav_bench::scenario::datapath::{
    measure_throughput, run_records, run_throughput, throughput_rows, ChunkSource, RecordSubject,
    StreamCheck, ThroughputPlan, Transport,
};
use keav_bench::{Ctx, Options, Quiet, Scenario};

fn quick(s: Scenario) -> Options {
    Options {
        scenarios: BTreeSet::from([s]),
        quick: true,
        ..Options::default()
    }
}

#[test]
fn records_rows_for_every_subject_and_size_with_the_protocols_overhead() {
    let opts = quick(Scenario::Records);
    let mut report = Report::default();
    let cancel = AtomicBool::new(false);
    let mut ctx = Ctx {
        opts: &opts,
        report: &mut report,
        progress: &Quiet,
        cancel: &cancel,
    };
    run_records(&mut ctx).unwrap();
    let subjects = RecordSubject::all();
    assert_eq!(
        subjects.len(),
        6,
        "keav, rustls and snow with two AEADs each"
    );
    assert_eq!(report.records.len(), subjects.len() * PAYLOAD_SIZES.len());
    for s in &subjects {
        for size in PAYLOAD_SIZES {
            let row = report
                .records
                .iter()
                .find(|r| r.subject == s.name() && r.size == size)
                .unwrap_or_else(|| panic!("no row for {} {size}", s.name()));
            assert_eq!(
                row.wire_bytes,
                size + s.overhead(),
                "{} at {size} B",
                row.subject
            );
            assert!(row.ns_median > 0.0 && row.ns_median.is_finite());
            assert!(row.ns_range.0 <= row.ns_median && row.ns_median <= row.ns_range.1);
            assert!(row.mb_per_s > 0.0);
        }
    }
    // The overheads themselves: keav 29, TLS 1.3 22, Noise 16.
    let names: BTreeSet<(String, usize)> = subjects
        .iter()
        .map(|s| {
            (
                s.name().split(' ').next().unwrap().to_string(),
                s.overhead(),
            )
        })
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            ("keav".to_string(), 29),
            ("rustls".to_string(), 22),
            ("snow".to_string(), 16)
        ])
    );
    assert!(!report.notes.iter().any(|n| n.contains("expected")));
}

#[test]
fn every_pipe_returns_exactly_what_was_sealed() {
    for s in RecordSubject::all() {
        let mut p = s.pipe().unwrap();
        for size in PAYLOAD_SIZES {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            assert_eq!(p.transfer(&msg).unwrap(), &msg[..], "{}", s.name());
            assert_eq!(p.checked_transfer(&msg).unwrap(), size + s.overhead());
        }
    }
}

#[test]
fn records_stop_when_cancelled() {
    let opts = quick(Scenario::Records);
    let mut report = Report::default();
    let cancel = AtomicBool::new(true);
    let mut ctx = Ctx {
        opts: &opts,
        report: &mut report,
        progress: &Quiet,
        cancel: &cancel,
    };
    assert!(matches!(
        run_records(&mut ctx),
        Err(keav_bench::BenchError::Cancelled)
    ));
    assert!(report.records.is_empty());
}

#[test]
fn throughput_small_transfer_is_checked_and_reported() {
    let plan = ThroughputPlan {
        total: 1 << 20,
        chunk: 10_000, // not a divisor: the last chunk is short
        runs: 1,
    };
    let mut seen = Vec::new();
    let runs = measure_throughput(plan, &mut |r| {
        seen.push(r.transport);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [Transport::PlainTcp, Transport::KeavTcp]);
    assert!(runs.iter().all(|r| r.secs > 0.0));
    let keav = runs
        .iter()
        .find(|r| r.transport == Transport::KeavTcp)
        .unwrap();
    assert!(keav.aead.is_some() && keav.handshake.is_some());
    let rows = throughput_rows(&runs, plan);
    assert_eq!(rows.len(), 2);
    assert!(rows[0].subject.starts_with("plain tcp"));
    assert!(rows[1].subject.starts_with("keav-net tcp channel"));
    for r in &rows {
        assert_eq!(r.bytes, 1 << 20);
        assert_eq!(r.runs, 1);
        assert!(r.mb_per_s > 0.0 && r.range.0 <= r.mb_per_s && r.mb_per_s <= r.range.1);
    }
}

#[test]
fn throughput_scenario_quick_run_pushes_two_rows() {
    let opts = quick(Scenario::Throughput);
    let mut report = Report::default();
    let cancel = AtomicBool::new(false);
    let mut ctx = Ctx {
        opts: &opts,
        report: &mut report,
        progress: &Quiet,
        cancel: &cancel,
    };
    run_throughput(&mut ctx).unwrap();
    assert_eq!(report.throughput.len(), 2);
    assert!(report.throughput.iter().all(|r| r.bytes == 8 << 20));
}

#[test]
fn a_corrupted_or_short_transfer_is_an_error() {
    let src = ChunkSource::new(50_000, 16_384).unwrap();
    let mut all = Vec::new();
    let mut c = Vec::new();
    for i in 0..src.chunks() {
        src.fill(i, &mut c);
        all.extend_from_slice(&c);
    }
    let mut ok = StreamCheck::new(&src);
    ok.feed(&all).unwrap();
    ok.finish().unwrap();

    let mut bad = all.clone();
    bad[40_000] ^= 1;
    assert!(StreamCheck::new(&src).feed(&bad).is_err());

    let mut short = StreamCheck::new(&src);
    short.feed(&all[..49_999]).unwrap();
    assert!(short.finish().is_err());

    let mut empty = StreamCheck::new(&src);
    empty.feed(&[]).unwrap();
    assert!(empty.finish().is_err());
}
