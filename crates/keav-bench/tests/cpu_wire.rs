//! The per-side accounting of the in-memory drivers and the `cpu` and `wire` scenarios.
#![cfg(feature = "peers")]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use keav_bench::keav::{
    run_keav_handshake_traced, HandshakeStats, SentMessage, KEAV_PACKET_OVERHEAD,
};
use keav_bench::peers::{noise_xx_handshake_traced, CertKind, NoiseStatics, TlsPair};
use keav_bench::report::{Subject, WireRow};
use keav_bench::scenario::wire::{keav_setup, keav_stats, KeavKind};
use keav_bench::{run, Options, Progress, Scenario};
use keav_proto::msg::Message;
use keav_proto::packet::decode_packet;
use rand_core::OsRng;

fn sums(trace: &[SentMessage], initiator: bool) -> (u32, u64) {
    let m: Vec<_> = trace
        .iter()
        .filter(|m| m.from_initiator == initiator)
        .collect();
    (m.len() as u32, m.iter().map(|m| m.bytes.len() as u64).sum())
}

fn assert_counts_match(stats: &HandshakeStats, trace: &[SentMessage]) {
    assert_eq!(
        (stats.initiator.messages, stats.initiator.bytes),
        sums(trace, true)
    );
    assert_eq!(
        (stats.responder.messages, stats.responder.bytes),
        sums(trace, false)
    );
    assert!(stats.initiator.messages > 0 && stats.responder.messages > 0);
    assert!(stats.flights >= 1);
}

#[test]
fn keav_counts_are_the_packets_sent() {
    for subject in Subject::KEAV {
        for kind in KeavKind::ALL {
            let Some(setup) = keav_setup(subject, kind).unwrap() else {
                assert!(kind == KeavKind::Preshared && subject != Subject::KeavNormal);
                continue;
            };
            let (o, trace) = run_keav_handshake_traced(&setup, &mut OsRng).unwrap();
            assert_counts_match(&o.stats, &trace);
            // Every counted unit is a valid RFC 6189 packet around a parseable message.
            for m in &trace {
                let p = decode_packet(&m.bytes).unwrap();
                assert_eq!(p.message.len() + KEAV_PACKET_OVERHEAD, m.bytes.len());
                Message::parse(p.message).unwrap();
            }
            // Depths never decrease along the sending order of one side.
            for side in [true, false] {
                let d: Vec<u32> = trace
                    .iter()
                    .filter(|m| m.from_initiator == side)
                    .map(|m| m.depth)
                    .collect();
                assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
            }
        }
    }
}

fn stats(subject: Subject, kind: KeavKind) -> HandshakeStats {
    keav_stats(subject, kind).unwrap().unwrap()
}

fn total_bytes(s: &HandshakeStats) -> u64 {
    s.initiator.bytes + s.responder.bytes
}

#[test]
fn preshared_is_smaller_and_shorter_than_dh() {
    let pre = stats(Subject::KeavNormal, KeavKind::Preshared);
    for kind in [KeavKind::DhCpace, KeavKind::DhSmp, KeavKind::DhPlain] {
        let dh = stats(Subject::KeavNormal, kind);
        assert!(
            total_bytes(&pre) < total_bytes(&dh),
            "{pre:?} vs {kind:?} {dh:?}"
        );
        assert!(pre.flights < dh.flights, "{pre:?} vs {kind:?} {dh:?}");
    }
    // Only normal mode has preshared sessions.
    for subject in [Subject::KeavNoContinuity, Subject::KeavParanoid] {
        assert!(keav_stats(subject, KeavKind::Preshared).unwrap().is_none());
    }
}

#[test]
fn smp_needs_more_flights_than_cpace_and_cpace_none_more_than_plain_dh() {
    for subject in Subject::KEAV {
        let cpace = stats(subject, KeavKind::DhCpace);
        let smp = stats(subject, KeavKind::DhSmp);
        let plain = stats(subject, KeavKind::DhPlain);
        assert!(
            smp.flights > cpace.flights,
            "{subject:?}: {smp:?} vs {cpace:?}"
        );
        // CPace rides in existing flights: no extra round trip over plain ZRTP, but bytes.
        assert_eq!(cpace.flights, plain.flights, "{subject:?}");
        assert!(total_bytes(&cpace) > total_bytes(&plain), "{subject:?}");
        assert!(total_bytes(&smp) > total_bytes(&cpace), "{subject:?}");
    }
}

#[test]
fn noise_counts_are_the_framed_xx_messages() {
    let (o, trace) = noise_xx_handshake_traced(&NoiseStatics::generate().unwrap()).unwrap();
    assert_counts_match(&o.stats, &trace);
    // -> e (32); <- e, ee, s, es (32 + 48 + 16); -> s, se (48 + 16); each + 2-byte prefix.
    let lens: Vec<usize> = trace.iter().map(|m| m.bytes.len()).collect();
    assert_eq!(lens, vec![34, 98, 66]);
    for m in &trace {
        let n = u16::from_be_bytes([m.bytes[0], m.bytes[1]]) as usize;
        assert_eq!(n + 2, m.bytes.len());
    }
    assert_eq!(o.stats.initiator.messages, 2);
    assert_eq!(o.stats.responder.messages, 1);
    assert_eq!(o.stats.flights, 2);
}

#[test]
fn tls_resumed_is_smaller_than_full_and_counts_match() {
    let pair = TlsPair::with_ocsp_staple(CertKind::Ed25519).unwrap();
    let (full, t_full) = pair.resumed_handshake_traced().unwrap();
    let (res, t_res) = pair.resumed_handshake_traced().unwrap();
    assert_eq!(full.kind(), Some(rustls::HandshakeKind::Full));
    assert_eq!(res.kind(), Some(rustls::HandshakeKind::Resumed));
    assert_counts_match(&full.stats, &t_full);
    assert_counts_match(&res.stats, &t_res);
    assert!(total_bytes(&res.stats) < total_bytes(&full.stats));
    assert!(res.stats.responder.bytes < full.stats.responder.bytes);
    assert_eq!(full.stats.flights, 2);
    assert_eq!(res.stats.flights, 2);
}

#[derive(Default)]
struct Count {
    stages: Mutex<Vec<(String, u64)>>,
    advanced: AtomicU64,
}

impl Progress for Count {
    fn stage(&self, name: &str, total: u64) {
        self.stages.lock().unwrap().push((name.to_string(), total));
    }
    fn advance(&self, n: u64) {
        self.advanced.fetch_add(n, Ordering::Relaxed);
    }
    fn note(&self, _: &str) {}
}

fn quick(s: Scenario) -> Options {
    Options {
        scenarios: BTreeSet::from([s]),
        quick: true,
        ..Options::default()
    }
}

#[test]
fn cpu_scenario_pushes_one_sane_row_per_subject() {
    let p = Count::default();
    let r = run(&quick(Scenario::Cpu), "test", &p, &AtomicBool::new(false)).unwrap();
    assert!(r.partial.is_none(), "{:?} {:?}", r.partial, r.notes);
    let names: Vec<&str> = r.cpu.iter().map(|c| c.subject.as_str()).collect();
    assert_eq!(names, keav_bench::scenario::cpu::SUBJECTS.to_vec());
    for c in &r.cpu {
        for v in [
            c.initiator_us,
            c.responder_us,
            c.server_hs_per_sec,
            c.total_range_us.0,
        ] {
            assert!(v.is_finite() && v > 0.0, "{c:?}");
        }
        assert!(c.total_range_us.0 <= c.total_range_us.1, "{c:?}");
        assert!(
            (c.server_hs_per_sec * c.responder_us - 1e6).abs() < 1.0,
            "{c:?}"
        );
        assert_eq!(c.iterations, 15);
    }
    let stages = p.stages.lock().unwrap().clone();
    assert_eq!(stages, vec![("cpu".to_string(), 24)]);
    assert_eq!(p.advanced.load(Ordering::Relaxed), 24);
}

#[test]
fn cpu_scenario_stops_when_cancelled() {
    let r = run(
        &quick(Scenario::Cpu),
        "test",
        &Count::default(),
        &AtomicBool::new(true),
    )
    .unwrap();
    assert!(r.cpu.is_empty());
    assert!(r.partial.is_some());
}

fn find<'a>(rows: &'a [WireRow], subject: &str, kind: &str) -> &'a WireRow {
    rows.iter()
        .find(|w| w.subject == subject && w.kind == kind)
        .unwrap_or_else(|| panic!("no row {subject} {kind}"))
}

#[test]
fn wire_scenario_rows() {
    let r = run(
        &quick(Scenario::Wire),
        "test",
        &Count::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(r.partial.is_none(), "{:?}", r.notes);
    assert!(
        !r.notes.iter().any(|n| n.contains("failed")),
        "{:?}",
        r.notes
    );
    // 3 modes × 3 DH kinds + normal preshared + 4 peers.
    assert_eq!(r.wire.len(), 14, "{:#?}", r.wire);
    let pre = find(&r.wire, "keav normal", "preshared");
    let dh = find(&r.wire, "keav normal", "dh+cpace");
    assert!(pre.initiator_bytes + pre.responder_bytes < dh.initiator_bytes + dh.responder_bytes);
    assert!(pre.flights < dh.flights);
    let full = find(&r.wire, Subject::TlsFullOcsp.name(), "full");
    let bare = find(&r.wire, "TLS 1.3 full, no staple (rustls)", "full");
    let res = find(&r.wire, Subject::TlsResumed.name(), "resumed");
    assert!(full.responder_bytes > bare.responder_bytes);
    assert!(res.responder_bytes < bare.responder_bytes);
    for w in &r.wire {
        assert!(
            w.initiator_messages > 0 && w.responder_messages > 0 && w.flights > 0,
            "{w:?}"
        );
        assert!(w.initiator_bytes > 0 && w.responder_bytes > 0, "{w:?}");
    }
}

/// The full cpu scenario, printed: `cargo test -p keav-bench --release --test cpu_wire --
/// --ignored --nocapture` (not a pass/fail check of timings).
#[test]
#[ignore = "slow in debug builds; run explicitly in release to print the numbers"]
fn print_full_cpu_scenario() {
    let mut o = quick(Scenario::Cpu);
    o.quick = false;
    let r = run(&o, "test", &Count::default(), &AtomicBool::new(false)).unwrap();
    assert_eq!(r.cpu.len(), keav_bench::scenario::cpu::SUBJECTS.len());
    for c in &r.cpu {
        println!(
            "{:40} ini {:9.1} us  resp {:9.1} us  total range {:9.1}..{:9.1}  server {:8.0}/s  n={}",
            c.subject,
            c.initiator_us,
            c.responder_us,
            c.total_range_us.0,
            c.total_range_us.1,
            c.server_hs_per_sec,
            c.iterations
        );
    }
    let total = |s: &str| {
        let c = r.cpu.iter().find(|c| c.subject == s).unwrap();
        c.initiator_us + c.responder_us
    };
    println!(
        "keav dh+cpace / tls full+ocsp = {:.2}; keav preshared / tls resumed = {:.2}",
        total("keav dh+cpace") / total("tls13 full (ed25519) + ocsp"),
        total("keav preshared") / total("tls13 resumed")
    );
}
