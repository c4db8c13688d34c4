//! Handshake CPU benchmark: both sides of one complete handshake, in memory, no I/O.
//!
//! Run with `cargo bench -p keav-bench --bench handshake`, then
//! `cargo run -p keav-bench --release --example handshake_ratios` for the ratios.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keav_bench::peers::{noise_xx_handshake, CertKind, NoiseStatics, TlsPair};
use keav_bench::{run_keav_handshake, KeavSetup};
use keav_proto::cache::Verification;
use keav_proto::handshake::KeyAgreement;
use keav_verify::Backend;
use rand_core::OsRng;
use rustls::HandshakeKind;

fn handshakes(c: &mut Criterion) {
    let mut rng = OsRng;
    let mut g = c.benchmark_group("handshake");

    // 1, 2: first session, DH mode + bound equality test.
    for (id, backend) in [
        ("keav-dh-cpace", Backend::CPace),
        ("keav-dh-smp", Backend::Smp),
    ] {
        let setup = KeavSetup::first_session(backend);
        let o = run_keav_handshake(&setup, &mut rng).expect("keav first session");
        assert_eq!(o.initiator.key_agreement, KeyAgreement::Dh);
        assert_eq!(o.initiator.verification, Verification::Bound);
        assert_eq!(o.initiator.backend, Some(backend));
        g.bench_function(id, |b| {
            b.iter(|| run_keav_handshake(black_box(&setup), &mut rng).expect("keav handshake"))
        });
    }

    // 3: preshared session from the cache of an earlier verified session (session 2 of 10).
    let setup = KeavSetup::preshared(&mut rng).expect("keav first session");
    let o = run_keav_handshake(&setup, &mut rng).expect("keav preshared session");
    assert_eq!(o.initiator.key_agreement, KeyAgreement::Preshared);
    assert_eq!(o.responder.key_agreement, KeyAgreement::Preshared);
    assert_eq!(o.initiator.verification, Verification::Skipped);
    g.bench_function("keav-preshared", |b| {
        b.iter(|| run_keav_handshake(black_box(&setup), &mut rng).expect("keav handshake"))
    });

    // 4: Noise XX (static keys made once, like device identities).
    let statics = NoiseStatics::generate().expect("noise keys");
    noise_xx_handshake(&statics).expect("noise handshake");
    g.bench_function("noise-xx", |b| {
        b.iter(|| noise_xx_handshake(black_box(&statics)).expect("noise handshake"))
    });

    // 5: TLS 1.3 full handshakes (certificate made once).
    for (id, kind) in [
        ("tls13-full-ed25519", CertKind::Ed25519),
        ("tls13-full-p256", CertKind::EcdsaP256),
    ] {
        let pair = TlsPair::new(kind).expect("tls setup");
        assert_eq!(
            pair.full_handshake().expect("tls").kind(),
            Some(HandshakeKind::Full)
        );
        g.bench_function(id, |b| {
            b.iter(|| black_box(&pair).full_handshake().expect("tls handshake"))
        });
    }

    // 6: TLS 1.3 resumed handshake (ticket from the previous connection, PSK + ECDHE).
    let pair = TlsPair::new(CertKind::Ed25519).expect("tls setup");
    assert_eq!(
        pair.resumed_handshake().expect("tls").kind(),
        Some(HandshakeKind::Full)
    );
    assert_eq!(
        pair.resumed_handshake().expect("tls").kind(),
        Some(HandshakeKind::Resumed)
    );
    g.bench_function("tls13-resumed", |b| {
        b.iter(|| {
            let o = black_box(&pair).resumed_handshake().expect("tls handshake");
            // Cheap check that every timed handshake really resumed.
            assert_eq!(o.kind(), Some(HandshakeKind::Resumed));
            o
        })
    });

    g.finish();
}

/// The primitives that dominate the handshakes, one operation each (one side's share).
fn primitives(c: &mut Criterion) {
    use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
    use curve25519_dalek::scalar::Scalar;
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
    use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey as SigKey, ED25519};
    use sha2::{Digest, Sha512};
    use x25519_dalek::{PublicKey, StaticSecret};

    let mut rng = OsRng;
    let mut g = c.benchmark_group("primitives");

    // keav's DH (x25519-dalek): fixed-base key generation, variable-base agreement.
    g.bench_function("dalek-x25519-keygen", |b| {
        b.iter(|| PublicKey::from(&StaticSecret::random_from_rng(rng)))
    });
    let peer = PublicKey::from(&StaticSecret::random_from_rng(rng));
    let mine = StaticSecret::random_from_rng(rng);
    g.bench_function("dalek-x25519-agree", |b| {
        b.iter(|| mine.diffie_hellman(black_box(&peer)))
    });

    // CPace on ristretto255: generator from SHA-512 + Elligator, y*G, y*Y_peer.
    g.bench_function("ristretto-hash-to-curve", |b| {
        b.iter(|| {
            let h: [u8; 64] = Sha512::digest(black_box(b"CPace generator string")).into();
            RistrettoPoint::from_uniform_bytes(&h)
        })
    });
    let gen = RistrettoPoint::from_uniform_bytes(&[7u8; 64]);
    let y_peer = (Scalar::random(&mut rng) * gen).compress();
    let y = Scalar::random(&mut rng);
    g.bench_function("ristretto-varbase-mul", |b| {
        b.iter(|| (y * black_box(gen)).compress())
    });
    g.bench_function("ristretto-decompress-mul", |b| {
        b.iter(|| {
            let p = CompressedRistretto(black_box(y_peer.to_bytes()))
                .decompress()
                .expect("valid point");
            (y * p).compress()
        })
    });
    g.bench_function("ristretto-basepoint-mul", |b| {
        b.iter(|| RistrettoPoint::mul_base(black_box(&y)).compress())
    });

    // rustls' primitives (ring): X25519 keygen + agreement, Ed25519 sign / verify.
    let sr = ring::rand::SystemRandom::new();
    let peer_key = EphemeralPrivateKey::generate(&X25519, &sr).expect("ring keygen");
    let peer_pub = peer_key.compute_public_key().expect("ring public key");
    g.bench_function("ring-x25519-keygen+agree", |b| {
        b.iter(|| {
            let k = EphemeralPrivateKey::generate(&X25519, &sr).expect("ring keygen");
            let _pub = k.compute_public_key().expect("ring public key");
            agree_ephemeral(
                k,
                &UnparsedPublicKey::new(&X25519, peer_pub.as_ref()),
                |s| s[0],
            )
            .expect("ring agree")
        })
    });
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&sr).expect("ed25519 keygen");
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed25519 key");
    let msg = [0x5au8; 130];
    g.bench_function("ring-ed25519-sign", |b| b.iter(|| kp.sign(black_box(&msg))));
    let sig = kp.sign(&msg);
    let vk = SigKey::new(&ED25519, kp.public_key().as_ref().to_vec());
    g.bench_function("ring-ed25519-verify", |b| {
        b.iter(|| vk.verify(black_box(&msg), sig.as_ref()).expect("verify"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = handshakes, primitives
}
criterion_main!(benches);
