//! The link proxy and the latency scenario end to end.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keav_bench::link::LinkProxy;
use keav_bench::report::{LatencySample, Subject};
use keav_bench::{LinkModel, Options, Progress, Quiet, Scenario};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn model(one_way_ms: u64, jitter_ms: u64) -> LinkModel {
    LinkModel {
        one_way: Duration::from_millis(one_way_ms),
        jitter: Duration::from_millis(jitter_ms),
    }
}

/// An echo server: answers every message of `len` bytes with the same bytes + 1.
async fn echo_server(len: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; len];
        while s.read_exact(&mut buf).await.is_ok() {
            for b in &mut buf {
                *b = b.wrapping_add(1);
            }
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_counts_two_flights_per_exchange_and_exact_bytes() {
    for (one_way, k, len) in [(0, 5, 100), (3, 4, 1000)] {
        let link = model(one_way, 0);
        let up = echo_server(len).await;
        let proxy = LinkProxy::start(link, up).await.unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        c.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; len];
        let started = Instant::now();
        let mut rtts = Vec::new();
        for i in 0..k {
            let msg: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
            let t = Instant::now();
            c.write_all(&msg).await.unwrap();
            c.read_exact(&mut buf).await.unwrap();
            rtts.push(t.elapsed());
            let want: Vec<u8> = msg.iter().map(|b| b.wrapping_add(1)).collect();
            assert_eq!(buf, want);
        }
        let done = Instant::now();
        let s = proxy.last_connection_stats().unwrap();
        assert_eq!(s.flights_until(done), 2 * k as u32, "link {link}");
        assert_eq!(s.flights(), 2 * k as u32);
        assert_eq!(s.bytes_c2s, (k * len) as u64);
        assert_eq!(s.bytes_s2c, (k * len) as u64);
        assert_eq!(s.bytes_to_client_until(done), (k * len) as u64);
        assert_eq!(s.flights_until(started), 0);
        // The injected delay is never shortened.
        for r in rtts {
            assert!(r >= link.rtt(), "{r:?} < {:?}", link.rtt());
        }
        assert!(done - started >= link.rtt() * k as u32);
        // Taking the stats forgets them.
        assert_eq!(
            proxy.take_last_connection_stats().unwrap().bytes_c2s,
            s.bytes_c2s
        );
        assert!(proxy.take_last_connection_stats().is_none());
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_keeps_the_byte_order_and_never_delivers_early() {
    // A sink server that records what it receives and when.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let mut arrivals = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            arrivals.push((Instant::now(), got.len() + n));
            got.extend_from_slice(&buf[..n]);
        }
        (got, arrivals)
    });
    let link = model(6, 3);
    let proxy = LinkProxy::start(link, up).await.unwrap();
    let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut sent = Vec::new();
    let mut sent_at = Vec::new();
    for i in 0..60u32 {
        let chunk: Vec<u8> = i.to_be_bytes().repeat(8);
        sent_at.push(Instant::now());
        c.write_all(&chunk).await.unwrap();
        sent.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
    c.shutdown().await.unwrap();
    let (got, arrivals) = server.await.unwrap();
    assert_eq!(got, sent, "bytes reordered or lost");
    // Every byte arrives at least one_way - jitter = 3 ms after it was written.
    for (at, upto) in arrivals {
        let last_chunk = (upto - 1) / 32;
        assert!(at >= sent_at[last_chunk] + Duration::from_millis(3));
    }
    let s = proxy.last_connection_stats().unwrap();
    assert_eq!(s.bytes_c2s, sent.len() as u64);
    assert_eq!(s.bytes_s2c, 0);
    assert_eq!(s.flights(), 0);
    drop(proxy); // dropping stops it without panicking
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_delay_is_never_shortened() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        Instant::now()
    });
    let link = model(20, 5);
    let proxy = LinkProxy::start(link, up).await.unwrap();
    let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let t = Instant::now();
    c.write_all(b"x").await.unwrap();
    let arrived = server.await.unwrap();
    assert!(
        arrived - t >= Duration::from_millis(15),
        "{:?}",
        arrived - t
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_closes_the_client_without_panicking() {
    // Bind and drop to get a port nobody listens on.
    let up = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = LinkProxy::start(model(0, 0), up).await.unwrap();
    let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut b = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)));
    // The proxy still works for the next connection.
    let up = echo_server(3).await;
    let proxy2 = LinkProxy::start(model(0, 0), up).await.unwrap();
    let mut c = TcpStream::connect(proxy2.local_addr()).await.unwrap();
    c.write_all(b"abc").await.unwrap();
    c.read_exact(&mut b[..3]).await.unwrap();
    assert_eq!(&b[..3], b"bcd");
    proxy.shutdown().await;
    proxy2.shutdown().await;
}

fn opts(links: Vec<LinkModel>, sessions: u32) -> Options {
    Options {
        scenarios: BTreeSet::from([Scenario::Latency]),
        reps: 1,
        sessions,
        links,
        out_dir: std::env::temp_dir().join("keav-bench-latency-test-unused"),
        ..Options::default()
    }
}

fn series(
    rows: &[LatencySample],
    link: LinkModel,
    subject: Subject,
    with_verification: bool,
) -> Vec<&LatencySample> {
    rows.iter()
        .filter(|r| {
            r.link == link && r.subject == subject && r.with_verification == with_verification
        })
        .collect()
}

fn kinds<'a>(rows: &[&'a LatencySample]) -> Vec<&'a str> {
    rows.iter().map(|r| r.kind.as_str()).collect()
}

#[cfg(feature = "peers")]
#[test]
fn scenario_measures_every_series_with_the_right_kinds_and_flights() {
    let links = vec![model(0, 0), model(5, 0)];
    let o = opts(links.clone(), 3);
    let cancel = AtomicBool::new(false);
    let report = keav_bench::run(&o, "test", &Quiet, &cancel).unwrap();
    assert!(
        report.partial.is_none(),
        "{:?} {:?}",
        report.partial,
        report.notes
    );
    let rows = &report.latency;
    assert_eq!(rows.len(), 2 * (6 + 3) * 3);
    for &link in &links {
        let kv = |sub, v| kinds(&series(rows, link, sub, v));
        assert_eq!(
            kv(Subject::KeavNormal, true),
            ["dh+cpace", "preshared", "preshared"]
        );
        assert_eq!(kv(Subject::KeavNoContinuity, true), ["dh+cpace"; 3]);
        assert_eq!(kv(Subject::KeavParanoid, true), ["dh+cpace"; 3]);
        assert_eq!(
            kv(Subject::KeavNormal, false),
            ["dh", "preshared", "preshared"]
        );
        assert_eq!(kv(Subject::KeavNoContinuity, false), ["dh"; 3]);
        assert_eq!(kv(Subject::KeavParanoid, false), ["dh"; 3]);
        assert_eq!(kv(Subject::TlsFullOcsp, true), ["full"; 3]);
        assert_eq!(
            kv(Subject::TlsResumed, true),
            ["full", "resumed", "resumed"]
        );
        assert_eq!(kv(Subject::NoiseXx, true), ["xx"; 3]);

        let all: Vec<&LatencySample> = rows.iter().filter(|r| r.link == link).collect();
        for r in &all {
            assert!(r.bytes_c2s > 0 && r.bytes_s2c > 0, "{r:?}");
            assert!(r.flights >= 2, "{r:?}");
            assert_eq!(r.flights % 2, 0, "the client waits for even flights: {r:?}");
            // Each flight took at least the one-way delay.
            assert!(
                r.latency_us >= u64::from(r.flights) * link.one_way.as_micros() as u64,
                "{r:?}"
            );
        }
        // keav's preshared sessions need fewer flights than its DH sessions.
        let keav: Vec<&&LatencySample> = all.iter().filter(|r| r.subject.is_keav()).collect();
        let max_pre = keav
            .iter()
            .filter(|r| r.kind == "preshared")
            .map(|r| r.flights)
            .max()
            .unwrap();
        let min_dh = keav
            .iter()
            .filter(|r| r.kind.starts_with("dh"))
            .map(|r| r.flights)
            .min()
            .unwrap();
        assert!(max_pre < min_dh, "preshared {max_pre} flights, dh {min_dh}");
        // TLS and Noise: one round trip before the client can send.
        for r in all.iter().filter(|r| !r.subject.is_keav()) {
            assert_eq!(r.flights, 2, "{r:?}");
        }
        // A resumed handshake receives fewer bytes than a full one (no certificate).
        let tls = series(rows, link, Subject::TlsResumed, true);
        assert!(tls[1].bytes_s2c < tls[0].bytes_s2c, "{tls:?}");
    }
}

/// Sets the stop flag after `after` steps.
struct StopAfter<'a> {
    after: u64,
    steps: AtomicU64,
    cancel: &'a AtomicBool,
}

impl Progress for StopAfter<'_> {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, n: u64) {
        if self.steps.fetch_add(n, Ordering::SeqCst) + n >= self.after {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
    fn note(&self, _: &str) {}
}

#[test]
fn cancel_stops_the_scenario_with_a_partial_report() {
    let o = opts(vec![model(0, 0)], 3);
    let cancel = AtomicBool::new(false);
    let progress = StopAfter {
        after: 4,
        steps: AtomicU64::new(0),
        cancel: &cancel,
    };
    let report = keav_bench::run(&o, "test", &progress, &cancel).unwrap();
    assert_eq!(report.latency.len(), 4);
    let why = report.partial.expect("partial");
    assert!(why.contains("latency"), "{why}");
    assert!(report.notes.is_empty(), "{:?}", report.notes);
}

/// A real measurement, printed (not asserted): `KEAV_BENCH_LINK=70ms KEAV_BENCH_REPS=2 cargo
/// test --release -p keav-bench --test latency -- --ignored --nocapture`.
#[cfg(feature = "peers")]
#[test]
#[ignore = "a measurement; run by hand"]
fn print_latency_table() {
    let link: LinkModel = std::env::var("KEAV_BENCH_LINK")
        .unwrap_or_else(|_| "70ms".into())
        .parse()
        .unwrap();
    let reps: u32 = std::env::var("KEAV_BENCH_REPS").map_or(2, |v| v.parse().unwrap());
    let mut o = opts(vec![link], 10);
    o.reps = reps;
    let cancel = AtomicBool::new(false);
    let report = keav_bench::run(&o, "test", &Quiet, &cancel).unwrap();
    assert!(report.partial.is_none(), "{:?}", report.notes);
    let rtt_ms = link.rtt().as_secs_f64() * 1000.0;
    println!("link {link} (RTT {rtt_ms} ms), reps {reps}");
    println!(
        "subject | verif | session | kinds | latency ms (min..max) | RTTs | flights | c2s | s2c"
    );
    for subject in Subject::KEAV.into_iter().chain(Subject::PEERS) {
        for v in [true, false] {
            if !subject.is_keav() && !v {
                continue;
            }
            let rows = series(&report.latency, link, subject, v);
            for session in 1..=10 {
                let r: Vec<&&LatencySample> =
                    rows.iter().filter(|r| r.session == session).collect();
                let mut k: Vec<&str> = r.iter().map(|r| r.kind.as_str()).collect();
                k.dedup();
                let lat: Vec<f64> = r.iter().map(|r| r.latency_us as f64 / 1000.0).collect();
                let min = lat.iter().copied().fold(f64::INFINITY, f64::min);
                let max = lat.iter().copied().fold(0.0, f64::max);
                let mut fl: Vec<u32> = r.iter().map(|r| r.flights).collect();
                fl.dedup();
                println!(
                    "{} | {v} | {session} | {} | {min:.1}..{max:.1} | {:.2} | {fl:?} | {} | {}",
                    subject.name(),
                    k.join(","),
                    if rtt_ms > 0.0 { min / rtt_ms } else { 0.0 },
                    r[0].bytes_c2s,
                    r[0].bytes_s2c
                );
            }
        }
    }
}
