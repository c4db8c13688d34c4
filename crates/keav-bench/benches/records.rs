//! Record-layer CPU benchmark: one record sealed by the sender and opened by the receiver,
//! both in one thread, in memory, per iteration.
//!
//! Run with `cargo bench -p keav-bench --bench records`, then
//! `cargo run -p keav-bench --release --example record_ratios` for the table and ratios.
//!
//! Every iteration sends a *fresh* record (the sender's sequence number advances, the
//! receiver's replay window moves with it), so every iteration really encrypts, authenticates
//! and decrypts. Before timing, each pipe is checked once to round-trip the payload.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keav_bench::peers::{NoisePipe, TlsPipe, TlsSuite, NOISE_XX, NOISE_XX_AESGCM};
use keav_bench::records::{KeavPipe, PAYLOAD_SIZES};
use keav_proto::record::Aead;

/// Something that moves one payload through one record and returns the plaintext received.
trait Pipe {
    fn send(&mut self, payload: &[u8]) -> &[u8];
}

impl Pipe for KeavPipe {
    fn send(&mut self, payload: &[u8]) -> &[u8] {
        self.transfer(payload).expect("keav record")
    }
}

impl Pipe for NoisePipe {
    fn send(&mut self, payload: &[u8]) -> &[u8] {
        self.transfer(payload).expect("noise record")
    }
}

impl Pipe for TlsPipe {
    fn send(&mut self, payload: &[u8]) -> &[u8] {
        self.transfer(payload).expect("tls record")
    }
}

fn bench_pipe<P: Pipe>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    mut pipe: P,
    payload: &[u8],
) {
    // The round trip, checked once before timing (and twice, so a second record opens too).
    for _ in 0..2 {
        assert_eq!(
            pipe.send(payload),
            payload,
            "{id}: payload did not round-trip"
        );
    }
    g.bench_with_input(BenchmarkId::new(id, payload.len()), payload, |b, p| {
        // Only the received length leaves the loop: the plaintext is not compared on every
        // iteration (the AEAD tag check already refuses anything else).
        b.iter(|| pipe.send(black_box(p)).len())
    });
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("records");
    for size in PAYLOAD_SIZES {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        bench_pipe(
            &mut g,
            "keav-aes256gcm",
            KeavPipe::new(Aead::Aes256Gcm).expect("keav"),
            &payload,
        );
        bench_pipe(
            &mut g,
            "keav-chacha20poly1305",
            KeavPipe::new(Aead::ChaCha20Poly1305).expect("keav"),
            &payload,
        );
        bench_pipe(
            &mut g,
            "rustls-aes256gcm",
            TlsPipe::new(TlsSuite::Aes256Gcm).expect("tls"),
            &payload,
        );
        bench_pipe(
            &mut g,
            "rustls-chacha20poly1305",
            TlsPipe::new(TlsSuite::ChaCha20Poly1305).expect("tls"),
            &payload,
        );
        bench_pipe(
            &mut g,
            "snow-aesgcm",
            NoisePipe::new(NOISE_XX_AESGCM).expect("noise"),
            &payload,
        );
        bench_pipe(
            &mut g,
            "snow-chachapoly",
            NoisePipe::new(NOISE_XX).expect("noise"),
            &payload,
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = records
}
criterion_main!(benches);
