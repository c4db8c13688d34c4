//! Throughput of one keav secure channel over TCP on loopback, against a plain tokio TCP
//! socket moving the same bytes the same way.
//!
//! Two devices with temporary stores pair over 127.0.0.1 (DH + CPace, first session; the
//! handshake is timed separately), then the initiator pushes `TOTAL` bytes in `CHUNK`-byte
//! `Channel::send` calls while the responder `recv`s until it has them all. The baseline is
//! a plain `TcpStream` pair (`TCP_NODELAY`, like keav's driver): `write_all` of the same
//! chunks, `read` into a 64 KiB buffer. Runs alternate (plain, keav, plain, keav, ...) and
//! the medians are reported; each run's clock starts before the first write and stops when
//! the receiver has the last byte. Before timing, one 8 MiB transfer of each kind is checked
//! end to end with SHA-256.
//!
//! Usage: `cargo run -p keav-bench --release --example tcp_throughput [MIB] [CHUNK] [RUNS]`
//! (defaults 256 MiB, 16384-byte writes, 5 runs of each).
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use keav_net::device::{Device, DeviceSettings};
use keav_net::session::{Options, PeerInfo};
use keav_net::tcp::{self, Listener};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Deterministic pseudo-random bytes (xorshift).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// User + system CPU time of this process (both sides run in it), from /proc (Linux).
fn cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

struct Run {
    secs: f64,
    cpu: Option<f64>,
}

/// Sends `payload` repeated until `total` bytes in `chunk`-byte writes over a plain TCP
/// pair; returns the receiver's digest of everything it read (if `digest`) and the timing.
async fn plain_run(total: usize, chunk: &[u8], digest: bool) -> (Run, Option<[u8; 32]>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (mut a, (mut b, _)) = (a.unwrap(), b.unwrap());
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    let chunk = chunk.to_vec();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            a.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        a.shutdown().await.unwrap();
    });
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        let mut h = digest.then(Sha256::new);
        loop {
            let n = b.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            if let Some(h) = h.as_mut() {
                h.update(&buf[..n]);
            }
            got += n;
        }
        (got, Instant::now(), h.map(|h| h.finalize().into()))
    });
    sender.await.unwrap();
    let (got, t1, d) = receiver.await.unwrap();
    assert_eq!(got, total, "plain TCP: byte count");
    let cpu = cpu0.zip(cpu_time()).map(|(a, b)| (b - a).as_secs_f64());
    (
        Run {
            secs: (t1 - t0).as_secs_f64(),
            cpu,
        },
        d,
    )
}

/// The same over one keav channel between `a` (initiator) and `b` (responder); returns the
/// timing, the receiver's digest (if `digest`) and the handshake time.
async fn keav_run(
    a: &Device,
    b: &Device,
    total: usize,
    chunk: &[u8],
    digest: bool,
) -> (Run, Option<[u8; 32]>, Duration, PeerInfo) {
    let mut listener = Listener::bind(b, "127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let addr = listener.local_addr();
    let opts = Options::default();
    let h0 = Instant::now();
    let (ca, cb) = tokio::join!(tcp::connect(a, addr, "b", &opts), listener.accept());
    let handshake = h0.elapsed();
    let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
    assert_eq!(ca.peer().channel_aead, cb.peer().channel_aead);
    let peer = ca.peer().clone();
    let chunk = chunk.to_vec();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            ca.send(&chunk[..n]).await.unwrap();
            sent += n;
        }
        ca.close().await.unwrap();
    });
    let receiver = tokio::spawn(async move {
        let mut got = 0;
        let mut h = digest.then(Sha256::new);
        while let Some(d) = cb.recv().await.unwrap() {
            if let Some(h) = h.as_mut() {
                h.update(&d);
            }
            got += d.len();
        }
        (got, Instant::now(), h.map(|h| h.finalize().into()))
    });
    sender.await.unwrap();
    let (got, t1, d) = receiver.await.unwrap();
    assert_eq!(got, total, "keav: byte count");
    let cpu = cpu0.zip(cpu_time()).map(|(a, b)| (b - a).as_secs_f64());
    listener.shutdown();
    (
        Run {
            secs: (t1 - t0).as_secs_f64(),
            cpu,
        },
        d,
        handshake,
        peer,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(256, |s| s.parse().expect("MIB"));
    let chunk_len: usize = args.next().map_or(16 * 1024, |s| s.parse().expect("CHUNK"));
    let runs: usize = args.next().map_or(5, |s| s.parse().expect("RUNS"));
    let total = mib << 20;

    let dir = tempfile::TempDir::new().expect("temp dir");
    let settings = DeviceSettings {
        verify_secret: Some(keav_verify::VerifySecret::from("bench pairing code")),
        ..DeviceSettings::default()
    };
    let a = Device::open(dir.path().join("a.keav"), settings.clone()).expect("device a");
    let b = Device::open(dir.path().join("b.keav"), settings).expect("device b");

    // Correctness first: 8 MiB of varying data, digests compared end to end.
    let check = data(8 << 20, 7);
    let want: [u8; 32] = Sha256::digest(&check).into();
    let (_, d) = plain_run(check.len(), &check, true).await;
    assert_eq!(d, Some(want), "plain TCP corrupted the check transfer");
    let (_, d, first_hs, first) = keav_run(&a, &b, check.len(), &check, true).await;
    assert_eq!(d, Some(want), "keav corrupted the check transfer");

    let chunk = data(chunk_len, 1);
    let (mut plain, mut keav, mut plain_cpu, mut keav_cpu, mut hs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut kinds = Vec::new();
    for _ in 0..runs {
        let (r, _) = plain_run(total, &chunk, false).await;
        plain.push(total as f64 / r.secs / 1e6);
        plain_cpu.extend(r.cpu.map(|c| c / (total as f64 / 1e9)));
        let (r, _, h, peer) = keav_run(&a, &b, total, &chunk, false).await;
        kinds.push(format!("{:?}", peer.key_agreement));
        keav.push(total as f64 / r.secs / 1e6);
        keav_cpu.extend(r.cpu.map(|c| c / (total as f64 / 1e9)));
        hs.push(h.as_secs_f64() * 1e3);
    }
    let (p, k) = (median(plain.clone()), median(keav.clone()));
    println!(
        "{mib} MiB one way in {chunk_len}-byte writes over 127.0.0.1, {runs} runs each, \
         MB/s = 10^6 payload bytes/s"
    );
    println!("| transport | median MB/s | all runs MB/s | CPU s per GB (both sides, median) |");
    println!("|---|---:|---|---:|");
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu = |v: &[f64]| {
        if v.is_empty() {
            "—".to_string()
        } else {
            format!("{:.2}", median(v.to_vec()))
        }
    };
    println!(
        "| plain tokio TCP | {p:.0} | {} | {} |",
        fmt(&plain),
        cpu(&plain_cpu)
    );
    let aead = first.channel_aead.name();
    println!(
        "| keav channel ({aead}) | {k:.0} | {} | {} |",
        fmt(&keav),
        cpu(&keav_cpu)
    );
    println!("\nkeav / plain TCP throughput ratio: {:.3}", k / p);
    println!(
        "handshake (connect + accept): first session ({:?}, {:?}) {:.1} ms; \
         later sessions ({}) median {:.1} ms",
        first.key_agreement,
        first.verification,
        first_hs.as_secs_f64() * 1e3,
        kinds.join(", "),
        median(hs)
    );
}
