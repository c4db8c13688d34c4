//! The `keav` command-line tool.
//!
//! Errors are one line on stderr (`keav: error: ...`) with exit status 1; usage errors exit 2.
//! `-v` shows debug detail on stderr; secrets are never logged at any verbosity.

mod bench_cmd;
mod c2_cmd;
mod demo;
mod device_cmds;
mod heart_demo;
mod net_cmds;
mod relay_cmd;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// keav: secure messaging between IoT devices with no PKI and no person in the loop.
#[derive(Parser, Debug)]
#[command(name = "keav", version, about)]
struct Cli {
    /// More detail on stderr (-v: debug, -vv: trace). Secrets are never logged.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Config file (TOML); default $KEAV_CONFIG or ~/.config/keav/config.toml if present.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Device store; default from the config, $KEAV_STORE or ~/.local/share/keav/device.redb.
    #[arg(long, global = true, value_name = "PATH")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the device store and identity (idempotent).
    Init,
    /// List known peers: mode, sessions, last verification, lockout.
    Peers,
    /// Forget a peer (by label or ZID): its retained secrets and counters are erased.
    Forget {
        /// Label or 24-hex-digit ZID.
        peer: String,
    },
    /// Wait for a peer, pair, then copy stdin to the peer and the peer to stdout.
    Listen(net_cmds::ListenArgs),
    /// Pair with a peer at an address (or found through rendezvous), then copy like `listen`.
    Connect(net_cmds::ConnectArgs),
    /// Rendezvous discovery: run a server, register, look up.
    #[command(subcommand)]
    Rendezvous(net_cmds::RendezvousCmd),
    /// Heart-rate demo: a monitor sends readings through a relay to a phone that goes
    /// offline; embedded broker, no external service (`keav demo pairing`: the pairing demo).
    Demo(demo::DemoArgs),
    /// Benchmark keav beside TLS 1.3 and Noise on this machine; writes bench-report/.
    Bench(bench_cmd::BenchArgs),
    /// Run a relay: forward durable messages along routes, keep a mailbox for offline devices.
    Relay(relay_cmd::RelayArgs),
    /// Command and control over MQTT: server, device agent, operator commands.
    #[command(subcommand)]
    C2(c2_cmd::C2Cmd),
}

fn main() -> ExitCode {
    // A re-executed child of the memory scenario does its job and exits before anything else.
    if let Some(code) = keav_bench::scenario::memory::maybe_run_worker() {
        return code;
    }
    let cli = Cli::parse();
    // rumqttd (the embedded broker) logs its clients' disconnects as errors: kept quiet
    // unless asked for with RUST_LOG.
    let level = match cli.verbose {
        0 => "error,rumqttd=off",
        1 => "debug,rumqttd=warn",
        _ => "trace",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if let Command::Bench(args) = &cli.command {
        // Needs neither the config file nor a store; runs its own runtimes.
        return bench_cmd::run(args);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keav: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Library errors often repeat their source in their own
/// message (`secure channel: X` with source `X`); such a repeat is left out.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !prev.is_empty() && prev.ends_with(&text) {
            prev = text;
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        prev = text;
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let file = settings::FileConfig::load(cli.config.as_deref())?;
    let store = || settings::store_path(cli.store.as_deref(), &file);
    match cli.command {
        Command::Init => device_cmds::init(&store()?),
        Command::Peers => device_cmds::peers(&store()?),
        Command::Forget { peer } => device_cmds::forget(&store()?, &peer),
        Command::Listen(args) => net_cmds::listen(&store()?, &file, args),
        Command::Connect(args) => net_cmds::connect(&store()?, &file, args),
        Command::Rendezvous(cmd) => net_cmds::rendezvous_cmd(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Relay(args) => relay_cmd::run(args),
        Command::C2(cmd) => c2_cmd::run(cmd),
        Command::Bench(_) => anyhow::bail!("internal: `bench` is dispatched in main"),
    }
}
