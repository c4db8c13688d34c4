//! Record-layer CPU benchmark: one record sealed by the sender and opened by the receiver,
//! both in one thread, in memory, per iteration.
//!
//! Run with `cargo bench -p keav-bench --bench records` (keav on ring's AEADs, ids
//! `keav-ring-*`), and for keav's pure-Rust default backend (ids `keav-*`) also
//! `cargo bench -p keav-bench --bench records --no-default-features --features peers -- records/keav-`;
//! then `cargo run -p keav-bench --release --example record_ratios` for the tables and ratios.
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
    // keav-proto's AEAD backend is chosen at build time (keav-bench feature `fast-aead`, on by
    // default); the bench ids carry it so that both builds' results sit side by side.
    let (gcm_id, chacha_id) = match keav_proto::record::AEAD_BACKEND {
        "ring" => ("keav-ring-aes256gcm", "keav-ring-chacha20poly1305"),
        _ => ("keav-aes256gcm", "keav-chacha20poly1305"),
    };
    eprintln!(
        "keav record AEAD backend: {} (bench ids {gcm_id}, {chacha_id})",
        keav_proto::record::AEAD_BACKEND
    );
    let mut g = c.benchmark_group("records");
    for size in PAYLOAD_SIZES {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        bench_pipe(
            &mut g,
            gcm_id,
            KeavPipe::new(Aead::Aes256Gcm).expect("keav"),
            &payload,
        );
        bench_pipe(
            &mut g,
            chacha_id,
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

/// The bare AEADs, seal + open in place of one payload with a fresh nonce, no record layer:
/// the floor under each stack (RustCrypto = what keav and snow use, ring = what rustls uses).
fn aeads(c: &mut Criterion) {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::KeyInit;
    use ring::aead::{LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};

    fn nonce12(n: u64) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_be_bytes());
        b
    }
    fn rust_crypto<A: AeadInPlace<NonceSize = aes_gcm::aead::consts::U12>>(
        a: &A,
        n: u64,
        buf: &mut [u8],
    ) {
        let nonce = nonce12(n);
        let tag = a
            .encrypt_in_place_detached(&nonce.into(), b"aad", buf)
            .expect("seal");
        a.decrypt_in_place_detached(&nonce.into(), b"aad", buf, &tag)
            .expect("open");
    }
    fn ring_aead(k: &LessSafeKey, n: u64, buf: &mut [u8]) {
        let aad = || ring::aead::Aad::from(b"aad");
        let tag = k
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce12(n)), aad(), buf)
            .expect("seal");
        k.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce12(n)),
            aad(),
            tag,
            buf,
            0..,
        )
        .expect("open");
    }

    let key = [0x42u8; 32];
    let gcm = aes_gcm::Aes256Gcm::new(&key.into());
    let chacha = chacha20poly1305::ChaCha20Poly1305::new(&key.into());
    let ring_gcm = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("key"));
    let ring_chacha = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("key"));

    let mut g = c.benchmark_group("aead");
    for size in PAYLOAD_SIZES {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = payload.clone();
        // Round trip checked once: seal+open in place must give the payload back.
        rust_crypto(&gcm, 0, &mut buf);
        rust_crypto(&chacha, 0, &mut buf);
        ring_aead(&ring_gcm, 0, &mut buf);
        ring_aead(&ring_chacha, 0, &mut buf);
        assert_eq!(buf, payload);
        let mut n = 1u64;
        g.bench_function(BenchmarkId::new("rustcrypto-aes256gcm", size), |b| {
            b.iter(|| {
                n += 1;
                rust_crypto(&gcm, n, black_box(&mut buf))
            })
        });
        g.bench_function(BenchmarkId::new("rustcrypto-chacha20poly1305", size), |b| {
            b.iter(|| {
                n += 1;
                rust_crypto(&chacha, n, black_box(&mut buf))
            })
        });
        g.bench_function(BenchmarkId::new("ring-aes256gcm", size), |b| {
            b.iter(|| {
                n += 1;
                ring_aead(&ring_gcm, n, black_box(&mut buf))
            })
        });
        g.bench_function(BenchmarkId::new("ring-chacha20poly1305", size), |b| {
            b.iter(|| {
                n += 1;
                ring_aead(&ring_chacha, n, black_box(&mut buf))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = records, aeads
}
criterion_main!(benches);
