//! `keav listen`, `keav connect`, `keav rendezvous …`: a secure netcat between devices.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use keav_net::device::{Device, DeviceSettings};
use keav_net::rendezvous;
use keav_net::session::{Options, PeerInfo, RecvHalf, SendHalf};
use keav_verify::VerifySecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::demo::{BackendArg, ModeArg};
use crate::device_cmds::open_existing;
use crate::settings::{CodeSource, FileConfig};

/// Settings of a pairing session, shared by `listen` and `connect`.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Key-continuity mode (default from the config file, else normal).
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// In normal mode, run DH and the equality test every N sessions (default 10).
    #[arg(long)]
    verify_every: Option<u32>,
    /// Equality test to prefer (default cpace).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Read the pairing code from the first line of this file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["code_prompt", "code_env"])]
    code_file: Option<PathBuf>,
    /// Ask for the pairing code on the terminal (not echoed).
    #[arg(long, conflicts_with = "code_env")]
    code_prompt: bool,
    /// Take the pairing code from $KEAV_PAIRING_CODE.
    #[arg(long)]
    code_env: bool,
    /// Accept a cache mismatch with only an unbound test (trust-on-first-use re-pairing).
    #[arg(long)]
    allow_repair: bool,
    /// Handshake deadline in seconds (default 10).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: Option<u64>,
}

impl SessionArgs {
    fn settings(&self, file: &FileConfig) -> Result<DeviceSettings> {
        let verify_every = self.verify_every.or(file.verify_every).unwrap_or(10);
        if verify_every == 0 {
            bail!("--verify-every must be at least 1");
        }
        let mode = match (self.mode, file.mode.as_deref()) {
            (Some(m), _) => m,
            (None, None) => ModeArg::Normal,
            (None, Some(name)) => ModeArg::parse(name)?,
        };
        let backend = match (self.backend, file.backend.as_deref()) {
            (Some(b), _) => b,
            (None, None) => BackendArg::Cpace,
            (None, Some(name)) => BackendArg::parse(name)?,
        };
        let code = if let Some(f) = &self.code_file {
            CodeSource::File(f.clone())
        } else if self.code_prompt {
            CodeSource::Prompt
        } else if self.code_env {
            CodeSource::Env
        } else if let Some(f) = &file.code_file {
            CodeSource::File(f.clone())
        } else {
            CodeSource::None
        };
        let mut s = DeviceSettings {
            mode: mode.mode(verify_every),
            allow_repair: self.allow_repair,
            verify_secret: code.read()?.map(VerifySecret::new),
            ..DeviceSettings::default()
        };
        // Preferred first, the other as fallback.
        s.backends.sort_by_key(|b| *b != backend.backend());
        if let Some(t) = self.timeout.or(file.handshake_timeout_secs) {
            s.handshake_timeout = Duration::from_secs(t);
        }
        if let Some(k) = file.max_failures {
            s.lockout.max_failures = k.max(1);
        }
        Ok(s)
    }
}

/// `keav listen`.
#[derive(Args, Debug)]
pub struct ListenArgs {
    /// Address to listen on (TCP unless --udp). Port 0 picks a free port; the bound address
    /// is printed on stderr.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Use UDP (RFC 6189 packets) instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Register the bound address under this identifier with a rendezvous server.
    #[arg(long, value_name = "ID", requires = "rendezvous")]
    register: Option<String>,
    /// The rendezvous server (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    rendezvous: Option<SocketAddr>,
    /// Keep accepting peers one after another instead of exiting after the first.
    #[arg(long)]
    keep_open: bool,
    #[command(flatten)]
    session: SessionArgs,
}

/// `keav connect`.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The local name of the peer (its cache is kept under this label).
    label: String,
    /// The peer's address (HOST:PORT); or use --rendezvous with --peer-id.
    addr: Option<SocketAddr>,
    /// Use UDP (RFC 6189 packets) instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Find the peer's address through this rendezvous server.
    #[arg(
        long,
        value_name = "ADDR",
        requires = "peer_id",
        conflicts_with = "addr"
    )]
    rendezvous: Option<SocketAddr>,
    /// The identifier the peer registered under.
    #[arg(long, value_name = "ID")]
    peer_id: Option<String>,
    #[command(flatten)]
    session: SessionArgs,
}

/// `keav rendezvous …`.
#[derive(Subcommand, Debug)]
pub enum RendezvousCmd {
    /// Run a rendezvous server.
    Serve {
        /// Address to listen on; port 0 picks a free port (printed on stderr).
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: SocketAddr,
        /// Keep registrations in this redb file (default: in memory).
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
    },
    /// Register an identifier and address.
    Register {
        /// Device identifier.
        id: String,
        /// Address to register.
        addr: SocketAddr,
        /// Rendezvous server.
        #[arg(long, value_name = "ADDR")]
        server: SocketAddr,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Look an identifier up.
    Lookup {
        /// Device identifier.
        id: String,
        /// Rendezvous server.
        #[arg(long, value_name = "ADDR")]
        server: SocketAddr,
    },
}

/// Runs `f` on a fresh runtime. The runtime is then shut down without waiting for blocking
/// threads: tokio reads stdin on one that cannot be cancelled, so waiting for it would keep the
/// process alive (after a fatal channel error, say) until its stdin happened to end.
fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(f);
    rt.shutdown_background();
    r
}

fn describe(p: &PeerInfo) -> String {
    format!(
        "paired with {}{} — session {}, {} keys, verification {}{}, SAS {}, {}",
        p.label
            .as_deref()
            .map_or(String::new(), |l| format!("{l} ")),
        p.peer_zid,
        p.session_number,
        p.key_agreement.name(),
        p.verification.name(),
        p.backend
            .map_or(String::new(), |b| format!(" ({})", b.name())),
        p.sas,
        p.channel_aead.name()
    )
}

/// Copies stdin to the peer and the peer to stdout until both directions are closed, or
/// until either fails.
async fn pipe<T>(mut tx: SendHalf<T>, mut rx: RecvHalf<T>) -> Result<()>
where
    T: Send + 'static,
    SendHalf<T>: Send,
    RecvHalf<T>: Send,
{
    let up = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = stdin.read(&mut buf).await.context("reading stdin")?;
            if n == 0 {
                tx.close().await.context("closing the channel")?;
                return Ok::<_, anyhow::Error>(());
            }
            tx.send(&buf[..n]).await.context("sending")?;
        }
    };
    let down = async move {
        let mut stdout = tokio::io::stdout();
        while let Some(data) = rx.recv().await.context("receiving")? {
            stdout.write_all(&data).await.context("writing stdout")?;
        }
        stdout.flush().await.context("writing stdout")?;
        Ok::<_, anyhow::Error>(())
    };
    // Both directions until both are closed, but the first failure ends the session: a
    // channel that was attacked or cut off must not wait for stdin to run dry.
    tokio::try_join!(up, down).map(|_| ())
}

fn device(store: &Path, args: &SessionArgs, file: &FileConfig) -> Result<Device> {
    let settings = args.settings(file)?;
    let store = open_existing(store)?;
    Ok(Device::from_store(store, settings)?)
}

/// `keav listen`.
pub fn listen(store: &Path, file: &FileConfig, args: ListenArgs) -> Result<()> {
    let dev = device(store, &args.session, file)?;
    block_on(async move {
        let opts = Options::default();
        macro_rules! serve {
            ($listener:expr) => {{
                let mut listener = $listener;
                let local = listener.local_addr();
                eprintln!(
                    "keav: listening on {} {local}",
                    if args.udp { "udp" } else { "tcp" }
                );
                if let (Some(id), Some(server)) = (&args.register, args.rendezvous) {
                    rendezvous::register(server, id, local, Duration::from_secs(3600), None)
                        .await
                        .with_context(|| format!("registering {id:?} with {server}"))?;
                    eprintln!("keav: registered {id:?} with rendezvous {server}");
                }
                loop {
                    let incoming = tokio::select! {
                        r = listener.next_incoming() => r?,
                        _ = tokio::signal::ctrl_c() => {
                            listener.shutdown();
                            return Ok(());
                        }
                    };
                    let result = match incoming.result {
                        Ok(channel) => {
                            eprintln!("keav: {}", describe(channel.peer()));
                            let (tx, rx) = channel.split();
                            pipe(tx, rx).await
                        }
                        Err(e) => Err(anyhow!(
                            "pairing with {} refused: {e}{}",
                            incoming.remote,
                            if e.counts_toward_lockout() {
                                " (counted toward lockout)"
                            } else {
                                ""
                            }
                        )),
                    };
                    match (result, args.keep_open) {
                        (r, false) => return r,
                        (Err(e), true) => eprintln!("keav: {}", crate::one_line(&e)),
                        (Ok(()), true) => {}
                    }
                }
            }};
        }
        if args.udp {
            serve!(keav_net::udp::Listener::bind(&dev, args.bind, opts).await?)
        } else {
            serve!(keav_net::tcp::Listener::bind(&dev, args.bind, opts).await?)
        }
    })
}

/// `keav connect`.
pub fn connect(store: &Path, file: &FileConfig, args: ConnectArgs) -> Result<()> {
    let dev = device(store, &args.session, file)?;
    block_on(async move {
        let addr = match (args.addr, args.rendezvous, &args.peer_id) {
            (Some(a), _, _) => a,
            (None, Some(server), Some(id)) => rendezvous::lookup(server, id)
                .await
                .with_context(|| format!("looking up {id:?} at {server}"))?
                .ok_or_else(|| anyhow!("{id:?} is not registered at {server}"))?,
            _ => bail!("give the peer's address, or --rendezvous with --peer-id"),
        };
        let opts = Options::default();
        let refused = |e: keav_net::Error| {
            let counted = if e.counts_toward_lockout() {
                " (counted toward lockout)"
            } else {
                ""
            };
            anyhow!(
                "pairing with {} at {addr} refused: {e}{counted}",
                args.label
            )
        };
        if args.udp {
            let ch = keav_net::udp::connect(&dev, addr, &args.label, &opts)
                .await
                .map_err(refused)?;
            eprintln!("keav: {}", describe(ch.peer()));
            let (tx, rx) = ch.split();
            pipe(tx, rx).await
        } else {
            let ch = keav_net::tcp::connect(&dev, addr, &args.label, &opts)
                .await
                .map_err(refused)?;
            eprintln!("keav: {}", describe(ch.peer()));
            let (tx, rx) = ch.split();
            pipe(tx, rx).await
        }
    })
}

/// `keav rendezvous …`.
pub fn rendezvous_cmd(cmd: RendezvousCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            RendezvousCmd::Serve { bind, db } => {
                let store: Arc<dyn rendezvous::RendezvousStore> = match &db {
                    Some(p) => Arc::new(
                        rendezvous::RedbRendezvousStore::open(p)
                            .with_context(|| format!("opening {}", p.display()))?,
                    ),
                    None => Arc::new(rendezvous::MemoryRendezvousStore::new()),
                };
                let listener = tokio::net::TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("binding {bind}"))?;
                eprintln!("keav: rendezvous listening on {}", listener.local_addr()?);
                rendezvous::serve(listener, store, rendezvous::Limits::default(), async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                Ok(())
            }
            RendezvousCmd::Register {
                id,
                addr,
                server,
                ttl,
            } => {
                let r =
                    rendezvous::register(server, &id, addr, Duration::from_secs(ttl), None).await?;
                println!(
                    "registered {id:?} -> {addr} until unix time {}",
                    r.expires_at
                );
                Ok(())
            }
            RendezvousCmd::Lookup { id, server } => {
                match rendezvous::lookup(server, &id).await? {
                    Some(a) => println!("{a}"),
                    None => bail!("{id:?} is not registered at {server}"),
                }
                Ok(())
            }
        }
    })
}
