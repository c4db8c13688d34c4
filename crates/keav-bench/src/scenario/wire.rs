//! The `wire` scenario: messages, bytes and flights of one handshake per protocol, mode and
//! kind, from the in-memory drivers' accounting.
//!
//! Bytes are protocol bytes without IP/UDP/TCP headers: keav counts RFC 6189 packets as
//! sent over UDP (message + 12-byte header + 4-byte CRC), TLS the records written (5-byte
//! headers included, the server's session tickets too), Noise the handshake messages with
//! a 2-byte length prefix each.

use keav_proto::cache::{Mode, Verification};
use keav_proto::handshake::KeyAgreement;
use keav_verify::Backend;
use rand_core::OsRng;

use crate::keav::{run_keav_handshake, HandshakeStats, KeavSetup};
use crate::report::{Subject, WireRow};
use crate::run::Ctx;
use crate::BenchError;

/// What a keav wire row runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeavKind {
    /// DH + CPace equality test.
    DhCpace,
    /// DH + SMP equality test.
    DhSmp,
    /// Preshared mode (normal mode, cached, between verifications).
    Preshared,
    /// DH without the equality test: plain RFC 6189 ZRTP.
    DhPlain,
}

impl KeavKind {
    /// All kinds, in table order.
    pub const ALL: [KeavKind; 4] = [
        KeavKind::DhCpace,
        KeavKind::DhSmp,
        KeavKind::Preshared,
        KeavKind::DhPlain,
    ];

    /// The `kind` column.
    pub fn name(self) -> &'static str {
        match self {
            KeavKind::DhCpace => "dh+cpace",
            KeavKind::DhSmp => "dh+smp",
            KeavKind::Preshared => "preshared",
            KeavKind::DhPlain => "dh (no verification)",
        }
    }
}

fn mode_of(subject: Subject) -> Mode {
    match subject {
        Subject::KeavNoContinuity => Mode::NoContinuity,
        Subject::KeavParanoid => Mode::Paranoid,
        _ => Mode::NORMAL,
    }
}

/// The setup whose next session is `kind` in the mode of `subject` (a keav subject), or
/// `None` where the mode has no such session (preshared outside `normal`).
///
/// `normal`: the first session for the DH kinds, the second for preshared. `paranoid`:
/// the second session (a cache exists, yet DH and the test still run). `no-continuity`:
/// any session (there is no cache).
pub fn keav_setup(subject: Subject, kind: KeavKind) -> Result<Option<KeavSetup>, BenchError> {
    let mode = mode_of(subject);
    let backend = match kind {
        KeavKind::DhSmp => Backend::Smp,
        _ => Backend::CPace,
    };
    let mut setup = KeavSetup::first_session(backend).in_mode(mode);
    if kind == KeavKind::DhPlain {
        setup = setup.without_verification();
    }
    let second = match (subject, kind) {
        (Subject::KeavNormal, KeavKind::Preshared) => true,
        (_, KeavKind::Preshared) => return Ok(None),
        (Subject::KeavParanoid, _) => true,
        _ => false,
    };
    if second {
        setup = setup.advanced(&mut OsRng)?;
    }
    Ok(Some(setup))
}

/// Runs one keav session of `kind` in the mode of `subject` and checks it was that kind.
pub fn keav_stats(subject: Subject, kind: KeavKind) -> Result<Option<HandshakeStats>, BenchError> {
    let Some(setup) = keav_setup(subject, kind)? else {
        return Ok(None);
    };
    let o = run_keav_handshake(&setup, &mut OsRng)?;
    let (agreement, verification, backend) = match kind {
        KeavKind::DhCpace => (KeyAgreement::Dh, Verification::Bound, Some(Backend::CPace)),
        KeavKind::DhSmp => (KeyAgreement::Dh, Verification::Bound, Some(Backend::Smp)),
        KeavKind::Preshared => (KeyAgreement::Preshared, Verification::Skipped, None),
        KeavKind::DhPlain => (KeyAgreement::Dh, Verification::NotSupported, None),
    };
    for s in [&o.initiator, &o.responder] {
        if s.key_agreement != agreement || s.verification != verification || s.backend != backend {
            return Err(BenchError::UnexpectedKind(format!(
                "{} {}: ran {} / {:?} / {:?}",
                subject.name(),
                kind.name(),
                s.key_agreement.name(),
                s.verification,
                s.backend
            )));
        }
    }
    Ok(Some(o.stats))
}

fn row(subject: &str, kind: &str, s: &HandshakeStats) -> WireRow {
    WireRow {
        subject: subject.to_string(),
        kind: kind.to_string(),
        initiator_messages: s.initiator.messages,
        initiator_bytes: s.initiator.bytes,
        responder_messages: s.responder.messages,
        responder_bytes: s.responder.bytes,
        flights: s.flights,
    }
}

/// The peer rows: (subject, kind, stats).
#[cfg(feature = "peers")]
fn peer_rows() -> Vec<(String, &'static str, Result<HandshakeStats, BenchError>)> {
    use crate::peers::{noise_xx_handshake, CertKind, NoiseStatics, TlsPair};
    use rustls::HandshakeKind;
    let full = |ocsp: bool| -> Result<HandshakeStats, BenchError> {
        let pair = if ocsp {
            TlsPair::with_ocsp_staple(CertKind::Ed25519)?
        } else {
            TlsPair::new(CertKind::Ed25519)?
        };
        Ok(pair.full_handshake()?.stats)
    };
    let resumed = || -> Result<HandshakeStats, BenchError> {
        let pair = TlsPair::with_ocsp_staple(CertKind::Ed25519)?;
        pair.resumed_handshake()?;
        let o = pair.resumed_handshake()?;
        if o.kind() != Some(HandshakeKind::Resumed) {
            return Err(BenchError::UnexpectedKind(format!("{:?}", o.kind())));
        }
        Ok(o.stats)
    };
    let noise = || -> Result<HandshakeStats, BenchError> {
        Ok(noise_xx_handshake(&NoiseStatics::generate()?)?.stats)
    };
    vec![
        (Subject::TlsFullOcsp.name().to_string(), "full", full(true)),
        (
            "TLS 1.3 full, no staple (rustls)".to_string(),
            "full",
            full(false),
        ),
        (Subject::TlsResumed.name().to_string(), "resumed", resumed()),
        (Subject::NoiseXx.name().to_string(), "xx", noise()),
    ]
}

#[cfg(not(feature = "peers"))]
fn peer_rows() -> Vec<(String, &'static str, Result<HandshakeStats, BenchError>)> {
    Vec::new()
}

/// Runs the scenario, pushing rows into `ctx.report`.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    let keav_rows = Subject::KEAV.len() * KeavKind::ALL.len();
    ctx.progress.stage("wire", keav_rows as u64 + 4);
    for subject in Subject::KEAV {
        for kind in KeavKind::ALL {
            ctx.check()?;
            match keav_stats(subject, kind) {
                Ok(Some(s)) => ctx.report.wire.push(row(subject.name(), kind.name(), &s)),
                Ok(None) => {}
                Err(e) => ctx.report.notes.push(format!(
                    "wire: {} {} failed: {e}",
                    subject.name(),
                    kind.name()
                )),
            }
            ctx.progress.advance(1);
        }
    }
    ctx.check()?;
    for (subject, kind, r) in peer_rows() {
        match r {
            Ok(s) => ctx.report.wire.push(row(&subject, kind, &s)),
            Err(e) => ctx
                .report
                .notes
                .push(format!("wire: {subject} failed: {e}")),
        }
        ctx.progress.advance(1);
    }
    ctx.report.notes.push(
        "Wire bytes are protocol bytes without IP/UDP/TCP headers: keav RFC 6189 packets as \
         over UDP (16 bytes of packet header and CRC each), TLS records (session tickets \
         included), Noise messages with a 2-byte length prefix."
            .into(),
    );
    Ok(())
}
