//! `keav relay`: runs a relay (keav_net::relay) until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use keav_net::relay::{Relay, RelayConfig, RouteRule};

/// `keav relay`.
#[derive(Args, Debug)]
pub struct RelayArgs {
    /// This relay's id: its device id on the brokers and its name over TCP (1 to 64
    /// characters of [A-Za-z0-9_-]).
    #[arg(long)]
    id: String,
    /// The mailbox file (redb; created if missing). It keeps the entries across restarts.
    #[arg(long, value_name = "PATH")]
    mailbox: PathBuf,
    /// Join this MQTT broker as device ID.
    #[arg(long, value_name = "HOST:PORT")]
    mqtt: Option<String>,
    /// Join this NATS server as device ID.
    #[arg(long, value_name = "HOST:PORT")]
    nats: Option<String>,
    /// Accept devices and relays over TCP here (port 0: any free port). The bound address
    /// is printed on stdout: `relay ID listening tcp=ADDR`.
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<SocketAddr>,
    /// A route, first match wins: DST=mqtt, DST=nats, DST=tcp (the device itself on that
    /// carrier), DST=mqtt:RELAY, DST=nats:RELAY, DST=tcp:HOST:PORT/RELAY (a next relay);
    /// DST is a device id or `*`. Repeat for several.
    #[arg(long = "route", value_name = "RULE", required = true, value_parser = parse_route)]
    routes: Vec<RouteRule>,
    /// Most entries per mailbox queue (default 1000000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_entries: Option<u64>,
    /// Most bytes per mailbox queue (default 1 GiB).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_bytes: Option<u64>,
    /// Frames pushed to a hop before its custody acks (default 256).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    window: Option<u32>,
}

fn parse_route(s: &str) -> Result<RouteRule, String> {
    s.parse::<RouteRule>().map_err(|e| e.to_string())
}

/// Waits for SIGTERM or Ctrl-C.
async fn stop_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

/// `keav relay`.
pub fn run(args: RelayArgs) -> Result<()> {
    let mut cfg = RelayConfig::new(&args.id, args.mailbox.clone());
    cfg.mqtt = args.mqtt.map(|a| (a, RelayConfig::link_options()));
    cfg.nats = args.nats.map(|a| (a, RelayConfig::link_options()));
    cfg.tcp_listen = args.listen_tcp;
    cfg.routes = args.routes;
    if let Some(n) = args.max_entries {
        cfg.limits.max_entries = n;
    }
    if let Some(n) = args.max_bytes {
        cfg.limits.max_bytes = n;
    }
    if let Some(w) = args.window {
        cfg.window = w;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let relay = Relay::start(cfg)
            .await
            .with_context(|| format!("starting relay {}", args.id))?;
        match relay.tcp_addr() {
            Some(a) => println!("relay {} listening tcp={a}", args.id),
            None => println!("relay {} running", args.id),
        }
        use std::io::Write;
        std::io::stdout().flush().context("writing stdout")?;
        stop_signal().await?;
        relay.shutdown().await.context("stopping the relay")?;
        Ok(())
    })
}
