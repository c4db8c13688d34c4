//! `keav demo`: two devices, each with its own durable store, pair through N sessions.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use keav_proto::cache::Mode;
use keav_proto::handshake::{Config, Endpoint, Event, PeerLookup, SessionOutcome};
use keav_store::Store;
use keav_verify::{Backend, VerifySecret};
use rand_core::OsRng;

/// Options of `keav demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of sessions.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sessions: u64,
    /// Key-continuity mode: no-continuity, normal or paranoid.
    #[arg(long, default_value = "normal")]
    mode: String,
    /// In normal mode, verify every N sessions.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    verify_every: u32,
    /// Equality test: cpace or smp.
    #[arg(long, default_value = "cpace")]
    backend: String,
    /// Run without a shared pairing code (verification is then reported as unbound).
    #[arg(long)]
    no_secret: bool,
    /// Keep the two device stores in this directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Parses a mode name.
pub fn parse_mode(name: &str, verify_every: u32) -> Result<Mode> {
    Ok(match name {
        "no-continuity" => Mode::NoContinuity,
        "normal" => Mode::Normal { verify_every },
        "paranoid" => Mode::Paranoid,
        other => bail!("unknown mode {other:?} (expected no-continuity, normal or paranoid)"),
    })
}

fn parse_backend(name: &str) -> Result<Backend> {
    match name {
        "cpace" => Ok(Backend::CPace),
        "smp" => Ok(Backend::Smp),
        other => bail!("unknown equality test {other:?} (expected cpace or smp)"),
    }
}

struct DemoDevice {
    name: &'static str,
    store: Store,
    cfg_mode: Mode,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    let mode = parse_mode(&args.mode, args.verify_every)?;
    let backend = parse_backend(&args.backend)?;
    let tmp;
    let dir: &Path = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path()
        }
    };
    // A pairing code both devices were provisioned with (printed on the devices' labels in
    // real life). It is never printed here.
    let secret = (!args.no_secret).then(|| b"demo pairing code 7391-2286".to_vec());
    let alice = DemoDevice {
        name: "alice",
        store: Store::open(&dir.join("alice.redb")).context("opening alice's store")?,
        cfg_mode: mode,
    };
    let bob = DemoDevice {
        name: "bob",
        store: Store::open(&dir.join("bob.redb")).context("opening bob's store")?,
        cfg_mode: mode,
    };
    println!(
        "keav demo: {} sessions, mode {}{}, equality test {:?}, pairing code {}",
        args.sessions,
        mode.name(),
        match mode {
            Mode::Normal { verify_every } => format!(" (verify every {verify_every})"),
            _ => String::new(),
        },
        backend,
        if secret.is_some() {
            "set"
        } else {
            "none (unbound)"
        }
    );
    println!("stores: {}", dir.display());
    println!(
        "{:>7}  {:<9}  {:<8}  {:<8}  {:<16}  {:>9}",
        "session", "keys", "verified", "result", "SAS", "time"
    );
    for k in 1..=args.sessions {
        let started = Instant::now();
        let (oa, _ob) = session(&alice, &bob, backend, secret.as_deref())
            .with_context(|| format!("session {k}"))?;
        let elapsed = started.elapsed();
        println!(
            "{:>7}  {:<9}  {:<8}  {:<8}  {:<16}  {:>7.2}ms",
            oa.session_number,
            oa.key_agreement.name(),
            if oa.verification.ran() { "yes" } else { "no" },
            oa.verification.name(),
            oa.sas,
            elapsed.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

fn config(d: &DemoDevice, backend: Backend, secret: Option<&[u8]>) -> Result<Config> {
    let id = d.store.identity().context("reading identity")?;
    let mut cfg = Config::new(id.zid, d.cfg_mode);
    cfg.backends = vec![backend];
    cfg.verify_secret = secret.map(|s| VerifySecret::new(s.to_vec()));
    Ok(cfg)
}

/// One session: alice initiates to "bob"; both persist the outcome.
fn session(
    alice: &DemoDevice,
    bob: &DemoDevice,
    backend: Backend,
    secret: Option<&[u8]>,
) -> Result<(Box<SessionOutcome>, Box<SessionOutcome>)> {
    let mut rng = OsRng;
    let unix = unix_now();
    let known = alice.store.peer_by_label(bob.name)?;
    let lookup = PeerLookup::Given(known.as_ref().map(|r| r.cache.clone()));
    let mut a = Endpoint::initiator(config(alice, backend, secret)?, lookup, 0, unix, &mut rng)?;
    let mut b = Endpoint::responder(config(bob, backend, secret)?, 0, unix, &mut rng);
    let mut b_peer = None;
    let (mut out_a, mut out_b) = (None, None);
    for _ in 0..64 {
        let mut moved = false;
        while let Some(m) = a.poll_transmit() {
            moved = true;
            b.handle_message(&m, 0, &mut rng)?;
        }
        while let Some(ev) = b.poll_event() {
            moved = true;
            match ev {
                Event::NeedPeerCache { zid, rs_id_hint } => {
                    let rec = match rs_id_hint {
                        Some(id) => bob.store.peer_by_initiator_rs_id(&id)?,
                        None => bob.store.peer_by_zid(&zid)?,
                    };
                    let cache = rec.as_ref().map(|r| r.cache.clone());
                    b_peer = rec.map(|r| r.id);
                    b.provide_peer_cache(cache, 0, &mut rng)?;
                }
                Event::Established(o) => {
                    // Persist before the Conf2ACK leaves.
                    persist(bob, b_peer, None, &o, unix)?;
                    out_b = Some(o);
                }
            }
        }
        while let Some(m) = b.poll_transmit() {
            moved = true;
            a.handle_message(&m, 0, &mut rng)?;
        }
        while let Some(ev) = a.poll_event() {
            moved = true;
            if let Event::Established(o) = ev {
                persist(
                    alice,
                    known.as_ref().map(|r| r.id),
                    Some(bob.name),
                    &o,
                    unix,
                )?;
                out_a = Some(o);
            }
        }
        if let (Some(_), Some(_)) = (&out_a, &out_b) {
            break;
        }
        if !moved {
            break;
        }
    }
    match (out_a, out_b) {
        (Some(x), Some(y)) => Ok((x, y)),
        _ => Err(anyhow!("handshake did not complete")),
    }
}

fn persist(
    d: &DemoDevice,
    id: Option<keav_store::PeerId>,
    label: Option<&str>,
    o: &SessionOutcome,
    unix: u64,
) -> Result<()> {
    let zid = (d.cfg_mode != Mode::Paranoid).then_some(o.peer_zid);
    let id = match id {
        Some(id) => id,
        None => d.store.create_peer(zid, label, d.cfg_mode, unix)?,
    };
    if let Some(u) = &o.cache_update {
        d.store.commit_session(&id, u, unix)?;
    }
    Ok(())
}
