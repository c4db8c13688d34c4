//! `keav demo`: the heart-rate scenario ([`crate::heart_demo`]); `keav demo pairing`: two
//! devices, each with its own durable store, pair through N sessions.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use keav_proto::cache::Mode;
use keav_proto::handshake::Config;
use keav_store::ledger::{pair_in_process, LocalDevice};
use keav_store::Store;
use keav_verify::{Backend, VerifySecret};
use rand_core::OsRng;

/// Key-continuity mode names on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// No cache: DH and verification every session.
    NoContinuity,
    /// Retained secrets; DH and verification every N sessions, preshared otherwise.
    Normal,
    /// Fresh identifiers every session; DH and verification every session.
    Paranoid,
}

/// Equality-test names on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// CPace (CFRG PAKE); its key is mixed into the session keys.
    Cpace,
    /// The Socialist Millionaire Protocol on ristretto255.
    Smp,
}

impl ModeArg {
    /// Parses a mode name from the config file.
    pub fn parse(name: &str) -> Result<ModeArg> {
        <ModeArg as ValueEnum>::from_str(name, false).map_err(|_| {
            anyhow::anyhow!("unknown mode {name:?} (expected no-continuity, normal or paranoid)")
        })
    }

    /// The protocol mode, with N for `normal`.
    pub fn mode(self, verify_every: u32) -> Mode {
        match self {
            ModeArg::NoContinuity => Mode::NoContinuity,
            ModeArg::Normal => Mode::Normal { verify_every },
            ModeArg::Paranoid => Mode::Paranoid,
        }
    }
}

impl BackendArg {
    /// Parses an equality-test name from the config file.
    pub fn parse(name: &str) -> Result<BackendArg> {
        <BackendArg as ValueEnum>::from_str(name, false)
            .map_err(|_| anyhow::anyhow!("unknown equality test {name:?} (expected cpace or smp)"))
    }

    /// The protocol backend.
    pub fn backend(self) -> Backend {
        match self {
            BackendArg::Cpace => Backend::CPace,
            BackendArg::Smp => Backend::Smp,
        }
    }
}

/// Options of `keav demo`: the heart-rate scenario, or a sub-demo.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    cmd: Option<DemoCmd>,
    #[command(flatten)]
    heart: crate::heart_demo::HeartArgs,
}

/// The other demos.
#[derive(clap::Subcommand, Debug)]
pub enum DemoCmd {
    /// Pair two in-process devices through several sessions and show what each one did
    /// (modes, retained secrets, when the equality test runs).
    Pairing(PairingArgs),
}

/// Runs `keav demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    match args.cmd {
        Some(DemoCmd::Pairing(p)) => run_pairing(p),
        None => crate::heart_demo::run(args.heart),
    }
}

/// Options of `keav demo pairing`.
#[derive(Args, Debug)]
pub struct PairingArgs {
    /// Number of sessions.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sessions: u64,
    /// Key-continuity mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Normal)]
    mode: ModeArg,
    /// In normal mode, run DH and the equality test every N sessions.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    verify_every: u32,
    /// Equality test.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpace)]
    backend: BackendArg,
    /// Run without a shared pairing code (verification is then reported as unbound).
    #[arg(long)]
    no_secret: bool,
    /// Keep the two device stores in this directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the pairing demo.
pub fn run_pairing(args: PairingArgs) -> Result<()> {
    if args.verify_every != 10 && args.mode != ModeArg::Normal {
        bail!("--verify-every only applies to --mode normal");
    }
    let mode = args.mode.mode(args.verify_every);
    let backend = args.backend.backend();
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
    // The pairing code both devices were provisioned with (printed on their labels in real
    // life). It is never printed or logged.
    let secret = (!args.no_secret).then(|| b"demo pairing code 7391-2286".to_vec());
    let alice = Store::open(&dir.join("alice.redb")).context("opening alice's store")?;
    let bob = Store::open(&dir.join("bob.redb")).context("opening bob's store")?;
    println!(
        "keav demo pairing: {} sessions, mode {}{}, equality test {}, pairing code {}",
        args.sessions,
        mode.name(),
        match mode {
            Mode::Normal { verify_every } => format!(" (verify every {verify_every})"),
            _ => String::new(),
        },
        backend.name(),
        if secret.is_some() {
            "set"
        } else {
            "none (unbound)"
        }
    );
    println!("device stores: {}", dir.display());
    println!(
        "{:>7}  {:<9}  {:<8}  {:<8}  {:<22}  {:>9}",
        "session", "keys", "verified", "result", "SAS", "time"
    );
    for k in 1..=args.sessions {
        let device = |store| -> Result<LocalDevice<'_>> {
            let mut config = Config::new(Store::identity(store)?.zid, mode);
            config.backends = vec![backend];
            config.verify_secret = secret.clone().map(VerifySecret::new);
            Ok(LocalDevice { store, config })
        };
        let started = Instant::now();
        let r = pair_in_process(
            device(&alice)?,
            "bob",
            device(&bob)?,
            unix_now(),
            &mut OsRng,
        )
        .with_context(|| format!("session {k}: store"))?;
        let elapsed = started.elapsed();
        let o = match (r.initiator, r.responder) {
            (Ok(o), Ok(_)) => o,
            (Err(e), _) | (_, Err(e)) => bail!("session {k} refused: {e}"),
        };
        println!(
            "{:>7}  {:<9}  {:<8}  {:<8}  {:<22}  {:>7.2}ms",
            o.session_number,
            o.key_agreement.name(),
            if o.verification.ran() { "yes" } else { "no" },
            o.verification.name(),
            o.sas,
            elapsed.as_secs_f64() * 1000.0
        );
    }
    println!("time = both devices' CPU for the handshake plus two durable (fsync'd) store commits");
    Ok(())
}
