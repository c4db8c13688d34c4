//! The `latency` scenario: the source patent's provisioning latency table.
//!
//! For every link model, keav in each key-continuity mode runs `sessions` sessions between
//! the same two devices (fresh stores per repetition), once with the KEAV equality test
//! (CPace then SMP, a shared pairing code) and once as plain RFC 6189 (no backends, KEAV not
//! required). Beside it, over the same link: rustls TLS 1.3 full handshakes with a stapled
//! OCSP response, resumed TLS 1.3 handshakes (session 1 of each series is necessarily full),
//! and snow Noise XX.
//!
//! Every session is one TCP connection from the client through a [`LinkProxy`] to the
//! server. The client's latency runs from just before `connect` until it holds the channel;
//! flights and bytes come from the proxy. Closing a session is not timed, and the next
//! session starts only after the server completed its side (so both caches are in step).
//! keav's latency includes persisting the session in the device store (an fsync), as a real
//! device would.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keav_net::device::{Device, DeviceSettings};
use keav_net::session::{Options as NetOptions, PeerInfo};
use keav_net::tcp::{self, Listener};
use keav_proto::cache::Mode;
use keav_verify::{Backend, VerifySecret};

use crate::keav::BENCH_PAIRING_CODE;
use crate::link::{ConnStats, LinkProxy};
use crate::options::LinkModel;
use crate::report::{LatencySample, Subject};
use crate::run::Ctx;
use crate::BenchError;

/// Label under which the client device knows the server device.
const PEER_LABEL: &str = "server";

/// Deadline of one handshake over `link`: 10 s plus 20 round trips.
pub fn handshake_timeout(link: LinkModel) -> Duration {
    Duration::from_secs(10) + link.rtt() * 20
}

/// What a keav session ran, from the client's [`PeerInfo`]: `dh+cpace`, `dh+smp`, `dh`,
/// `preshared` (with `+backend` if an equality test ran in a preshared session).
pub fn keav_kind(p: &PeerInfo) -> String {
    let ka = p.key_agreement.name();
    match p.backend {
        Some(b) if p.verification.ran() => format!("{ka}+{}", b.name()),
        _ => ka.to_string(),
    }
}

/// Runs the scenario, pushing rows into `ctx.report`.
pub fn run(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    ctx.check()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(run_links(ctx));
    rt.shutdown_timeout(Duration::from_secs(2));
    r
}

async fn run_links(ctx: &mut Ctx<'_>) -> Result<(), BenchError> {
    // `quick` does not change the repetitions here: the caller chose `reps` (the CLI makes
    // it 3 for --quick unless --reps is given).
    let reps = ctx.opts.reps;
    #[cfg(feature = "peers")]
    let peers = peers::Peers::new()?;
    let series_per_link: u64 = if cfg!(feature = "peers") { 9 } else { 6 };
    for link in ctx.opts.links.clone() {
        let total = series_per_link * u64::from(reps) * u64::from(ctx.opts.sessions);
        ctx.progress.stage(&format!("latency {link}"), total);
        for subject in Subject::KEAV {
            for with_verification in [true, false] {
                for rep in 0..reps {
                    keav_series(ctx, link, subject, with_verification, rep).await?;
                }
            }
        }
        #[cfg(feature = "peers")]
        for subject in Subject::PEERS {
            for rep in 0..reps {
                peers.series(ctx, link, subject, rep).await?;
            }
        }
    }
    Ok(())
}

fn mode_of(subject: Subject, verify_every: u32) -> Result<Mode, BenchError> {
    match subject {
        Subject::KeavNoContinuity => Ok(Mode::NoContinuity),
        Subject::KeavNormal => Ok(Mode::Normal { verify_every }),
        Subject::KeavParanoid => Ok(Mode::Paranoid),
        other => Err(BenchError::Report(format!(
            "{} is not a keav mode",
            other.name()
        ))),
    }
}

async fn timed<T, F>(timeout: Duration, what: &'static str, f: F) -> Result<T, BenchError>
where
    F: std::future::Future<Output = Result<T, BenchError>>,
{
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| BenchError::Incomplete(what))?
}

#[allow(clippy::too_many_arguments)]
fn sample(
    link: LinkModel,
    subject: Subject,
    rep: u32,
    session: u32,
    with_verification: bool,
    kind: String,
    latency: Duration,
    stats: &ConnStats,
    last_input: Instant,
) -> LatencySample {
    LatencySample {
        link,
        subject,
        session,
        rep,
        with_verification,
        kind,
        latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        flights: stats.flights_until(last_input),
        bytes_c2s: stats.bytes_c2s,
        bytes_s2c: stats.bytes_to_client_until(last_input),
    }
}

/// One series of keav sessions between two fresh devices.
async fn keav_series(
    ctx: &mut Ctx<'_>,
    link: LinkModel,
    subject: Subject,
    with_verification: bool,
    rep: u32,
) -> Result<(), BenchError> {
    ctx.check()?;
    let timeout = handshake_timeout(link);
    let settings = DeviceSettings {
        mode: mode_of(subject, ctx.opts.verify_every)?,
        backends: if with_verification {
            vec![Backend::CPace, Backend::Smp]
        } else {
            Vec::new()
        },
        verify_secret: with_verification.then(|| VerifySecret::new(BENCH_PAIRING_CODE.to_vec())),
        require_keav: with_verification,
        handshake_timeout: timeout,
        ..DeviceSettings::default()
    };
    let dir = tempfile::TempDir::new()?;
    let client = Device::open(dir.path().join("client.keav"), settings.clone())?;
    let server = Device::open(dir.path().join("server.keav"), settings)?;
    let opts = NetOptions::default();
    let mut listener = Listener::bind(&server, "127.0.0.1:0", opts.clone()).await?;
    let proxy = LinkProxy::start(link, listener.local_addr()).await?;
    let addr: SocketAddr = proxy.local_addr();
    let result = async {
        for session in 1..=ctx.opts.sessions {
            ctx.check()?;
            let started = Instant::now();
            let mut ch = timed(timeout, "keav (timed out)", async {
                Ok(tcp::connect(&client, addr, PEER_LABEL, &opts).await?)
            })
            .await?;
            let finished = Instant::now();
            let mut sch = timed(timeout, "keav server (timed out)", async {
                Ok(listener.next_incoming().await?.result?)
            })
            .await?;
            let stats = proxy
                .take_last_connection_stats()
                .ok_or_else(|| BenchError::Report("the link proxy saw no connection".into()))?;
            ctx.report.latency.push(sample(
                link,
                subject,
                rep,
                session,
                with_verification,
                keav_kind(ch.peer()),
                finished - started,
                &stats,
                finished,
            ));
            // Untimed: the client closes, the server reads the close and closes too.
            let _ = tokio::time::timeout(timeout, async {
                let _ = ch.close().await;
                let _ = sch.recv().await;
                let _ = sch.close().await;
            })
            .await;
            ctx.progress.advance(1);
        }
        Ok(())
    }
    .await;
    listener.shutdown();
    proxy.shutdown().await;
    result
}

#[cfg(feature = "peers")]
mod peers {
    use std::sync::Arc;

    use rustls::client::Resumption;

    use super::{handshake_timeout, sample};
    use crate::link::LinkProxy;
    use crate::net_peers::{noise_connect, tls_connect, ClientSession, NoiseKeys, PeerServer};
    use crate::options::LinkModel;
    use crate::peers::{CertKind, TlsPair, NOISE_XX};
    use crate::report::Subject;
    use crate::run::Ctx;
    use crate::BenchError;

    /// Certificates and keys made once per run.
    pub(super) struct Peers {
        tls: TlsPair,
        noise: NoiseKeys,
    }

    impl Peers {
        pub(super) fn new() -> Result<Self, BenchError> {
            Ok(Self {
                tls: TlsPair::with_ocsp_staple(CertKind::Ed25519)?,
                noise: NoiseKeys::generate(NOISE_XX)?,
            })
        }

        /// One series of `sessions` handshakes of `subject` through a fresh proxy.
        pub(super) async fn series(
            &self,
            ctx: &mut Ctx<'_>,
            link: LinkModel,
            subject: Subject,
            rep: u32,
        ) -> Result<(), BenchError> {
            ctx.check()?;
            let timeout = handshake_timeout(link);
            let mut server = match subject {
                Subject::NoiseXx => PeerServer::noise(self.noise.clone(), timeout).await?,
                _ => PeerServer::tls(self.tls.server_config(), timeout).await?,
            };
            let client_config = match subject {
                Subject::TlsFullOcsp => Some(self.tls.client_config_full()),
                Subject::TlsResumed => {
                    // A fresh session store per series: session 1 is a full handshake.
                    let mut c = (*self.tls.client_config_resume()).clone();
                    c.resumption = Resumption::in_memory_sessions(8);
                    Some(Arc::new(c))
                }
                Subject::NoiseXx => None,
                other => {
                    return Err(BenchError::Report(format!(
                        "{} is not a peer protocol",
                        other.name()
                    )))
                }
            };
            let proxy = LinkProxy::start(link, server.local_addr()).await?;
            let addr = proxy.local_addr();
            for session in 1..=ctx.opts.sessions {
                ctx.check()?;
                let connect = async {
                    match &client_config {
                        Some(c) => tls_connect(addr, c.clone(), self.tls.server_name()).await,
                        None => noise_connect(addr, &self.noise).await,
                    }
                };
                let (timing, client): (_, ClientSession) = tokio::time::timeout(timeout, connect)
                    .await
                    .map_err(|_| BenchError::Incomplete("peer handshake (timed out)"))??;
                server.next_done(timeout).await?;
                let stats = proxy
                    .take_last_connection_stats()
                    .ok_or_else(|| BenchError::Report("the link proxy saw no connection".into()))?;
                ctx.report.latency.push(sample(
                    link,
                    subject,
                    rep,
                    session,
                    true,
                    timing.kind.clone(),
                    timing.latency(),
                    &stats,
                    timing.last_input,
                ));
                // Untimed; reads the session tickets the next resumed handshake needs.
                client.close(timeout).await?;
                ctx.progress.advance(1);
            }
            proxy.shutdown().await;
            Ok(())
        }
    }
}
