//! The `keav` command-line tool.
//!
//! Today it offers `keav demo`: two in-process devices with durable stores pair through twelve
//! sessions in `normal` mode and print what each session did.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// keav: secure messaging between IoT devices with no PKI and no person in the loop.
#[derive(Parser, Debug)]
#[command(name = "keav", version, about)]
struct Cli {
    /// More detail (-v: debug, -vv: trace). Secrets are never logged.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pair two in-process devices through several sessions and show what each one did.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keav: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
