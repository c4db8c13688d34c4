//! The `cpu` scenario: CPU per handshake on each side, in memory, single-threaded, no I/O.
//!
//! Each subject is warmed up, then timed in batches; every handshake's per-side CPU comes
//! from the drivers' own accounting ([`crate::keav::SideStats::cpu`]). Per batch the median
//! of each side is taken; a row reports the median over batches, the spread of the batch
//! medians of initiator + responder and the server's handshakes per second on one core.

use rand_core::OsRng;

use crate::keav::{run_keav_handshake, HandshakeStats, KeavSetup};
use crate::report::stats::{median, range};
use crate::report::CpuRow;
use crate::run::Ctx;
use crate::BenchError;
use keav_proto::cache::Verification;
use keav_proto::handshake::KeyAgreement;
use keav_verify::Backend;

/// Batches and handshakes per batch of a full run.
pub const BATCHES: u32 = 20;
/// See [`BATCHES`].
pub const PER_BATCH: u32 = 50;
/// Batches and handshakes per batch of a `--quick` run.
pub const QUICK_BATCHES: u32 = 3;
/// See [`QUICK_BATCHES`].
pub const QUICK_PER_BATCH: u32 = 5;

/// One handshake of a subject, returning its accounting.
type Handshake<'a> = Box<dyn FnMut() -> Result<HandshakeStats, BenchError> + 'a>;

/// Row names of the subjects, in run order.
pub const SUBJECTS: [&str; 8] = [
    "keav dh+cpace",
    "keav dh+smp",
    "keav preshared",
    "keav dh (no verification, plain ZRTP)",
    "tls13 full (ed25519) + ocsp",
    "tls13 full (ed25519)",
    "tls13 resumed",
    "noise xx",
];

fn check_keav(
    o: &crate::keav::KeavOutcome,
    agreement: KeyAgreement,
    verification: Verification,
) -> Result<(), BenchError> {
    for s in [&o.initiator, &o.responder] {
        if s.key_agreement != agreement || s.verification != verification {
            return Err(BenchError::UnexpectedKind(format!(
                "keav session was {} / {:?}, expected {} / {verification:?}",
                s.key_agreement.name(),
                s.verification,
                agreement.name()
            )));
        }
    }
    Ok(())
}

fn keav_subject(
    setup: KeavSetup,
    agreement: KeyAgreement,
    verification: Verification,
) -> Result<Handshake<'static>, BenchError> {
    // Check the kind once, outside the timed loop.
    check_keav(
        &run_keav_handshake(&setup, &mut OsRng)?,
        agreement,
        verification,
    )?;
    Ok(Box::new(move || {
        let o = run_keav_handshake(&setup, &mut OsRng)?;
        Ok(o.stats)
    }))
}

/// Builds the handshake closure of subject `i` of [`SUBJECTS`].
#[cfg(feature = "peers")]
fn subject(i: usize) -> Result<Handshake<'static>, BenchError> {
    use crate::peers::{noise_xx_handshake, CertKind, NoiseStatics, TlsPair};
    use rustls::HandshakeKind;
    match i {
        0..=3 => keav_only(i),
        4 | 5 => {
            let pair = if i == 4 {
                TlsPair::with_ocsp_staple(CertKind::Ed25519)?
            } else {
                TlsPair::new(CertKind::Ed25519)?
            };
            Ok(Box::new(move || {
                let o = pair.full_handshake()?;
                if o.kind() != Some(HandshakeKind::Full) {
                    return Err(BenchError::UnexpectedKind(format!("{:?}", o.kind())));
                }
                Ok(o.stats)
            }))
        }
        6 => {
            let pair = TlsPair::with_ocsp_staple(CertKind::Ed25519)?;
            // The first handshake is full and fills the session store.
            pair.resumed_handshake()?;
            Ok(Box::new(move || {
                let o = pair.resumed_handshake()?;
                if o.kind() != Some(HandshakeKind::Resumed) {
                    return Err(BenchError::UnexpectedKind(format!(
                        "tls did not resume: {:?}",
                        o.kind()
                    )));
                }
                Ok(o.stats)
            }))
        }
        _ => {
            let statics = NoiseStatics::generate()?;
            Ok(Box::new(move || Ok(noise_xx_handshake(&statics)?.stats)))
        }
    }
}

/// Without the `peers` feature only the keav subjects run.
#[cfg(not(feature = "peers"))]
fn subject(i: usize) -> Result<Handshake<'static>, BenchError> {
    if i <= 3 {
        keav_only(i)
    } else {
        Err(BenchError::Report(
            "built without the `peers` feature".into(),
        ))
    }
}

fn keav_only(i: usize) -> Result<Handshake<'static>, BenchError> {
    match i {
        0 => keav_subject(
            KeavSetup::first_session(Backend::CPace),
            KeyAgreement::Dh,
            Verification::Bound,
        ),
        1 => keav_subject(
            KeavSetup::first_session(Backend::Smp),
            KeyAgreement::Dh,
            Verification::Bound,
        ),
        2 => keav_subject(
            KeavSetup::preshared(&mut OsRng)?,
            KeyAgreement::Preshared,
            Verification::Skipped,
        ),
        _ => keav_subject(
            KeavSetup::first_session(Backend::CPace).without_verification(),
            KeyAgreement::Dh,
            Verification::NotSupported,
        ),
    }
}

fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Times `hs` in `batches` × `per_batch` handshakes after a warm-up of `per_batch`,
/// calling `between` after each batch (progress, cancellation).
pub fn measure(
    name: &str,
    hs: &mut dyn FnMut() -> Result<HandshakeStats, BenchError>,
    batches: u32,
    per_batch: u32,
    between: &mut dyn FnMut() -> Result<(), BenchError>,
) -> Result<CpuRow, BenchError> {
    for _ in 0..per_batch.max(1) {
        hs()?;
    }
    let (mut ini, mut res, mut tot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..batches {
        let (mut bi, mut br, mut bt) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..per_batch {
            let s = hs()?;
            let (i, r) = (us(s.initiator.cpu), us(s.responder.cpu));
            bi.push(i);
            br.push(r);
            bt.push(i + r);
        }
        ini.push(median(&bi));
        res.push(median(&br));
        tot.push(median(&bt));
        between()?;
    }
    let responder_us = median(&res);
    Ok(CpuRow {
        subject: name.to_string(),
        initiator_us: median(&ini),
        responder_us,
        total_range_us: range(&tot),
        iterations: u64::from(batches) * u64::from(per_batch),
        server_hs_per_sec: if responder_us > 0.0 {
            1e6 / responder_us
        } else {
            0.0
        },
    })
}

/// Runs the scenario, pushing one row per subject into `ctx.report`.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    let (batches, per_batch) = if ctx.opts.quick {
        (QUICK_BATCHES, QUICK_PER_BATCH)
    } else {
        (BATCHES, PER_BATCH)
    };
    ctx.progress
        .stage("cpu", u64::from(batches) * SUBJECTS.len() as u64);
    for (i, name) in SUBJECTS.iter().enumerate() {
        ctx.check()?;
        let mut hs = match subject(i) {
            Ok(h) => h,
            Err(e) => {
                ctx.report.notes.push(format!("cpu: {name} skipped: {e}"));
                ctx.progress.advance(u64::from(batches));
                continue;
            }
        };
        let r = {
            let c = &*ctx;
            let mut between = || {
                c.progress.advance(1);
                c.check()
            };
            measure(name, &mut hs, batches, per_batch, &mut between)
        };
        let row = match r {
            Ok(row) => row,
            Err(BenchError::Cancelled) => return Err(BenchError::Cancelled),
            Err(e) => {
                ctx.progress.note(&format!("cpu: {name} failed: {e}"));
                ctx.report.notes.push(format!("cpu: {name} failed: {e}"));
                continue;
            }
        };
        ctx.report.cpu.push(row);
    }
    Ok(())
}
