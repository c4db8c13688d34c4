//! `keav c2 ...`: the C2 server, the device agent, and the operator's commands
//! (keav_c2::server, keav_c2::agent). Operator commands talk to the server's HTTP API with
//! the operator token (from `--operator-token-file` or `$KEAV_C2_OPERATOR_TOKEN`, never the
//! command line).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use keav_c2::agent::{Agent, AgentError, AgentOptions, Handlers, Identity, StateStore};
use keav_c2::engine::{JoinPolicy, JoinRequestKind};
use keav_c2::identity::api::EnrollmentRequestBody;
use keav_c2::identity::Client;
use keav_c2::keys::{Alg, DeviceId};
use keav_c2::registry::{RedbRegistry, Registry};
use keav_c2::server::api::{
    ActivateBody, CommandBody, ConfidentialBody, DecideBody, SentBody, UpdateBody, ValueBody,
};
use keav_c2::server::client::OperatorClient;
use keav_c2::server::{BrokerSetup, Server, ServerNotice, ServerOptions};
use keav_c2::wire::{Data, JoinCode, Status, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// `keav c2`.
#[derive(Subcommand, Debug)]
pub enum C2Cmd {
    /// Run the C2 server: registry, broker configuration (and broker), identity service and
    /// operator API.
    Serve(ServeArgs),
    /// Run a device agent (registers first if its data directory holds no identity).
    Device(DeviceArgs),
    /// Operator: issue a one-time enrollment token for a device.
    Enroll(EnrollArgs),
    /// Operator: list the fleet.
    Devices(OperatorArgs),
    /// Operator: send an action, data or generic message to a device or a group.
    Send(SendArgs),
    /// Operator: start an update on a device or a group.
    Update(UpdateArgs),
    /// Operator: activate an update a device reported as verified.
    Activate(ActivateArgs),
    /// Operator: where command tokens stand.
    Responses(ResponsesArgs),
    /// Operator: joins awaiting a decision (with the words of human-moderated ones).
    Joins(OperatorArgs),
    /// Operator: accept (or --reject) a pending join.
    Approve(ApproveArgs),
    /// Operator: revoke a device (registry, server, broker account).
    Revoke(DeviceVerbArgs),
    /// Operator: tell a device its identity is withdrawn, then revoke it.
    Deregister(DeviceVerbArgs),
    /// Operator: end a device's membership (it stays registered).
    Terminate(DeviceVerbArgs),
    /// Operator: send a join command to a registered device.
    JoinCommand(DeviceVerbArgs),
    /// Operator: reset the server's replay continuity with a device that lost its state
    /// (after `keav c2 device --reset-state`); it must join again.
    Reset(DeviceVerbArgs),
    /// Operator: the server's counters (accepted, dropped by reason).
    Stats(OperatorArgs),
    /// Operator: start (or rekey) a confidential session with a device, require or stop
    /// requiring confidentiality for it, or show where it stands.
    Confidential(ConfidentialArgs),
}

/// `keav c2 confidential`.
#[derive(Args, Debug)]
pub struct ConfidentialArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// The device (16 hex digits).
    device: String,
    /// From now on refuse plain data from the device and send it none.
    #[arg(long, conflicts_with = "allow_plain")]
    require: bool,
    /// Stop requiring confidentiality.
    #[arg(long)]
    allow_plain: bool,
    /// Do not start a handshake (only set the policy / show the state).
    #[arg(long)]
    no_start: bool,
    /// Wait up to this many seconds for the session to be established.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

/// `keav c2 serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Data directory (server key, engine state, registry, broker files).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Algorithm of a new server key: ed25519 (default) or rsa2048.
    #[arg(long, default_value = "ed25519")]
    alg: String,
    /// Keep the registry in PostgreSQL at this URL instead of DATA/registry.redb.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// PostgreSQL schema of the registry.
    #[arg(long, default_value = "keav_c2")]
    pg_schema: String,
    /// Serve the identity service and the operator API here (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8700")]
    http: SocketAddr,
    /// Mosquitto configuration directory (default DATA/mosquitto).
    #[arg(long, value_name = "DIR")]
    mosquitto_dir: Option<PathBuf>,
    /// Start Mosquitto with the generated configuration (the default unless --broker-pid).
    #[arg(long)]
    spawn_broker: bool,
    /// Broker port (0 with --spawn-broker: a free loopback port).
    #[arg(long, default_value_t = 0)]
    broker_port: u16,
    /// Pid of a running Mosquitto that uses the generated configuration (keav reloads it).
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// Simple joins: `moderated` (the operator approves) or `automatic`.
    #[arg(long, default_value = "moderated")]
    join_policy: String,
    /// File holding the operator token (default: DATA/operator.token, made if missing).
    #[arg(long, value_name = "FILE")]
    operator_token_file: Option<PathBuf>,
    /// Most HTTP requests without the operator token in flight at once (more get 503).
    #[arg(long, value_name = "N", default_value_t = 64)]
    http_max_in_flight: usize,
    /// Most operator requests in flight at once, in a pool of their own (so that clients
    /// without the token cannot keep the operator from revoking).
    #[arg(long, value_name = "N", default_value_t = 16)]
    http_max_operator_in_flight: usize,
    /// Seconds a request without the operator token may take to send its body (then 408).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    http_body_timeout: u64,
    /// Seconds any HTTP request may take, its body included (then 408).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    http_request_timeout: u64,
    /// Most HTTP connections open at once (one more is closed at once).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    http_max_connections: usize,
    /// Seconds a connection may take to send a request's head, or stay idle between
    /// requests (then it is closed).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    http_header_timeout: u64,
}

/// Where the operator's server is and how to authenticate.
#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// The server's HTTP address (default $KEAV_C2_SERVER or http://127.0.0.1:8700).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// File holding the operator token (default $KEAV_C2_OPERATOR_TOKEN).
    #[arg(long, value_name = "FILE")]
    operator_token_file: Option<PathBuf>,
}

/// `keav c2 enroll`.
#[derive(Args, Debug)]
pub struct EnrollArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// The device's name.
    #[arg(long)]
    name: Option<String>,
    /// A group the device joins (repeat for several).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Token lifetime in seconds.
    #[arg(long)]
    ttl: Option<u64>,
}

/// `keav c2 device`.
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// The device's data directory (key, identity, engine state, updates).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The identity service, to register (first run only).
    #[arg(long, value_name = "URL")]
    identity: Option<String>,
    /// File holding the enrollment token (first run only; or $KEAV_C2_ENROLLMENT_TOKEN).
    #[arg(long, value_name = "FILE")]
    enrollment_token_file: Option<PathBuf>,
    /// Algorithm of the device key: ed25519 (default) or rsa2048.
    #[arg(long, default_value = "ed25519")]
    alg: String,
    /// Ask to join: `simple`, `human` (words shown here) or `observed:OBSERVER-ID`.
    #[arg(long, value_name = "HOW")]
    join: Option<String>,
    /// Broker address, instead of the one the identity service gave.
    #[arg(long, value_name = "HOST:PORT")]
    broker: Option<String>,
    /// Refuse plain data from the server (only data sealed in the confidential session).
    #[arg(long)]
    require_confidential: bool,
    /// Start from a fresh state even though the state file is missing or not this
    /// device's (the operator must then run `keav c2 reset <id>` on the server).
    #[arg(long)]
    reset_state: bool,
}

/// `keav c2 send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// One device (16 hex digits).
    #[arg(long, conflicts_with = "group")]
    device: Option<String>,
    /// A group.
    #[arg(long)]
    group: Option<String>,
    /// An action id.
    #[arg(long, conflicts_with_all = ["data", "generic_hex"])]
    action: Option<u16>,
    /// The action's arguments, hex.
    #[arg(long, value_name = "HEX")]
    args_hex: Option<String>,
    /// A data id (with --value).
    #[arg(long, requires = "value")]
    data: Option<String>,
    /// The data value; typed by --type.
    #[arg(long)]
    value: Option<String>,
    /// The value's type: u64, i64, f64, bool, text (default) or hex (bytes).
    #[arg(long = "type", default_value = "text")]
    value_type: String,
    /// Generic bytes, hex.
    #[arg(long, value_name = "HEX")]
    generic_hex: Option<String>,
    /// Wait up to this many seconds for the responses, and print them.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    /// Seal the data in each device's confidential session (`keav c2 confidential` first).
    #[arg(long, requires = "data")]
    confidential: bool,
}

/// `keav c2 update`.
#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// One device.
    #[arg(long, conflicts_with = "group")]
    device: Option<String>,
    /// A group.
    #[arg(long)]
    group: Option<String>,
    /// Where devices download the update (http://).
    #[arg(long)]
    url: String,
    /// The update's SHA-256 (64 hex digits)…
    #[arg(long, conflicts_with = "file")]
    digest: Option<String>,
    /// …or the update file itself, to compute it.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Wait up to this many seconds for the responses.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

/// `keav c2 activate`.
#[derive(Args, Debug)]
pub struct ActivateArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// The device.
    #[arg(long)]
    device: String,
    /// The update's token.
    #[arg(long)]
    token: String,
}

/// `keav c2 responses`.
#[derive(Args, Debug)]
pub struct ResponsesArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// Tokens (hex).
    #[arg(required = true)]
    tokens: Vec<String>,
}

/// `keav c2 approve`.
#[derive(Args, Debug)]
pub struct ApproveArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// The device.
    device: String,
    /// The words read on the device (human-moderated joins), space-separated.
    #[arg(long)]
    words: Option<String>,
    /// Refuse the join.
    #[arg(long)]
    reject: bool,
}

/// A command on one device.
#[derive(Args, Debug)]
pub struct DeviceVerbArgs {
    #[command(flatten)]
    op: OperatorArgs,
    /// The device (16 hex digits).
    device: String,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn read_secret(file: Option<&Path>, env: &str, what: &str) -> Result<Zeroizing<String>> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(Zeroizing::new(s.trim().to_string()));
    }
    match std::env::var(env) {
        Ok(s) if !s.trim().is_empty() => Ok(Zeroizing::new(s.trim().to_string())),
        _ => bail!("no {what}: give a file or set ${env}"),
    }
}

fn operator(op: &OperatorArgs) -> Result<(String, Zeroizing<String>)> {
    let server = op
        .server
        .clone()
        .or_else(|| std::env::var("KEAV_C2_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8700".into());
    let token = read_secret(
        op.operator_token_file.as_deref(),
        "KEAV_C2_OPERATOR_TOKEN",
        "operator token",
    )?;
    Ok((server, token))
}

fn op_client(op: &OperatorArgs) -> Result<OperatorClient> {
    let (server, token) = operator(op)?;
    OperatorClient::new(&server, token).map_err(|e| anyhow!("{e}"))
}

fn parse_alg(s: &str) -> Result<Alg> {
    Alg::from_name(s).ok_or_else(|| anyhow!("unknown algorithm {s:?} (ed25519 or rsa2048)"))
}

fn from_hex(s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        bail!("odd number of hex digits");
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| anyhow!("not hex: {s:?}"))
        })
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `keav c2 ...`.
pub fn run(cmd: C2Cmd) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        C2Cmd::Serve(a) => rt.block_on(serve(a)),
        C2Cmd::Device(a) => rt.block_on(device(a)),
        C2Cmd::Enroll(a) => rt.block_on(enroll(a)),
        C2Cmd::Devices(op) => rt.block_on(devices(op)),
        C2Cmd::Send(a) => rt.block_on(send(a)),
        C2Cmd::Update(a) => rt.block_on(update(a)),
        C2Cmd::Activate(a) => rt.block_on(async {
            let c = op_client(&a.op)?;
            c.activate(&ActivateBody {
                device: a.device,
                token: a.token.clone(),
            })
            .await?;
            println!("activate sent (token {})", a.token);
            Ok(())
        }),
        C2Cmd::Responses(a) => rt.block_on(async {
            let c = op_client(&a.op)?;
            for t in c.responses(&a.tokens).await? {
                print_token(&t);
            }
            Ok(())
        }),
        C2Cmd::Joins(op) => rt.block_on(async {
            let c = op_client(&op)?;
            let joins = c.joins().await?;
            if joins.is_empty() {
                println!("no join pending");
            }
            for j in joins {
                match j.words {
                    Some(w) => println!("{} {} words: {}", j.device, j.method, w.join(" ")),
                    None => println!("{} {}", j.device, j.method),
                }
            }
            Ok(())
        }),
        C2Cmd::Approve(a) => rt.block_on(async {
            let c = op_client(&a.op)?;
            let words = a
                .words
                .map(|w| w.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default();
            let d = c
                .decide(
                    &a.device,
                    &DecideBody {
                        accept: !a.reject,
                        words,
                    },
                )
                .await?;
            match (d.joined, d.reason) {
                (true, _) => println!("{} joined", a.device),
                (false, r) => println!("{} not joined: {}", a.device, r.unwrap_or_default()),
            }
            Ok(())
        }),
        C2Cmd::Revoke(a) => rt.block_on(verb(a, "revoke")),
        C2Cmd::Deregister(a) => rt.block_on(verb(a, "deregister")),
        C2Cmd::Terminate(a) => rt.block_on(verb(a, "terminate")),
        C2Cmd::JoinCommand(a) => rt.block_on(verb(a, "join")),
        C2Cmd::Reset(a) => rt.block_on(verb(a, "reset")),
        C2Cmd::Stats(op) => rt.block_on(async {
            let s = op_client(&op)?.stats().await?;
            println!("accepted {}", s.accepted);
            for (r, n) in s.dropped {
                println!("dropped {r} {n}");
            }
            println!("oversized {}", s.oversized);
            for (r, n) in s.confidential {
                println!("confidential {r} {n}");
            }
            Ok(())
        }),
        C2Cmd::Confidential(a) => rt.block_on(confidential(a)),
    }
}

async fn confidential(a: ConfidentialArgs) -> Result<()> {
    let c = op_client(&a.op)?;
    let required = match (a.require, a.allow_plain) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let sent = c
        .confidential(
            &a.device,
            &ConfidentialBody {
                start: Some(!a.no_start),
                required,
            },
        )
        .await?;
    print_sent(&sent);
    let deadline = Instant::now() + Duration::from_secs(a.wait.unwrap_or(0));
    loop {
        let i = c.confidential_info(&a.device).await?;
        let done = i.established && !i.handshaking;
        if done || Instant::now() >= deadline {
            println!(
                "device {} required {} established {} handshaking {} session {} sessions {} sealed {} opened {}",
                i.device,
                i.required,
                i.established,
                i.handshaking,
                i.session.as_deref().unwrap_or("-"),
                i.sessions,
                i.records_sealed,
                i.records_opened
            );
            if a.wait.is_some() && !done {
                bail!("no session established within the wait");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn verb(a: DeviceVerbArgs, verb: &str) -> Result<()> {
    let c = op_client(&a.op)?;
    let s = c.device_verb(&a.device, verb).await?;
    match s.sent.first() {
        Some(t) => println!("{verb} {}: sent (token {})", a.device, t.token),
        None => println!("{verb} {}: done", a.device),
    }
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<()> {
    if a.http_max_in_flight == 0 || a.http_max_operator_in_flight == 0 {
        bail!("--http-max-in-flight and --http-max-operator-in-flight must be at least 1");
    }
    if a.http_body_timeout == 0 || a.http_request_timeout == 0 {
        bail!("--http-body-timeout and --http-request-timeout must be at least 1 second");
    }
    if a.http_max_connections == 0 {
        bail!("--http-max-connections must be at least 1");
    }
    if a.http_header_timeout == 0 {
        bail!("--http-header-timeout must be at least 1 second");
    }
    let token_path = a
        .operator_token_file
        .clone()
        .unwrap_or_else(|| a.data.join("operator.token"));
    std::fs::create_dir_all(&a.data).with_context(|| format!("creating {}", a.data.display()))?;
    let token = if token_path.exists() {
        read_secret(
            Some(&token_path),
            "KEAV_C2_OPERATOR_TOKEN",
            "operator token",
        )?
    } else {
        let t = keav_c2::acl::new_password();
        let dir = token_path.parent().unwrap_or(Path::new("."));
        let name = token_path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("bad token file name"))?;
        keav_c2::acl::replace_file(dir, name, t.as_bytes())?;
        eprintln!("operator token written to {}", token_path.display());
        t
    };
    let mut o = ServerOptions::new(&a.data, token);
    o.alg = parse_alg(&a.alg)?;
    o.http = Some(a.http);
    o.http_max_in_flight = a.http_max_in_flight;
    o.http_max_operator_in_flight = a.http_max_operator_in_flight;
    o.http_body_timeout = Duration::from_secs(a.http_body_timeout);
    o.http_request_timeout = Duration::from_secs(a.http_request_timeout);
    o.http_max_connections = a.http_max_connections;
    o.http_header_timeout = Duration::from_secs(a.http_header_timeout);
    o.engine.join_policy = match a.join_policy.as_str() {
        "moderated" => JoinPolicy::Moderated,
        "automatic" => JoinPolicy::Automatic,
        other => bail!("unknown join policy {other:?} (moderated or automatic)"),
    };
    let mdir = a
        .mosquitto_dir
        .clone()
        .unwrap_or_else(|| a.data.join("mosquitto"));
    o.broker = match (a.broker_pid, a.spawn_broker) {
        (Some(_), true) => bail!("--spawn-broker and --broker-pid exclude each other"),
        (Some(pid), false) => {
            if a.broker_port == 0 {
                bail!("--broker-pid needs --broker-port");
            }
            BrokerSetup::Managed {
                dir: mdir,
                port: a.broker_port,
                pid,
            }
        }
        (None, _) => {
            if a.broker_port == 1883 {
                eprintln!("note: starting Mosquitto on 1883, the well-known port");
            }
            BrokerSetup::Spawn {
                dir: mdir,
                port: a.broker_port,
                program: PathBuf::from("mosquitto"),
            }
        }
    };
    match a.postgres {
        Some(url) => {
            let r = keav_c2::registry::PgRegistry::connect(&url, &a.pg_schema)
                .await
                .context("connecting to PostgreSQL")?;
            serve_with(o, r).await
        }
        None => {
            let r = RedbRegistry::open(&a.data.join("registry.redb"))?;
            serve_with(o, r).await
        }
    }
}

async fn serve_with<R: Registry>(o: ServerOptions, registry: R) -> Result<()> {
    let server = Server::start(o, registry).await?;
    println!(
        "keav c2 server {} ({}) broker {} http http://{}",
        server.id(),
        server.public_key().alg(),
        server.broker_addr(),
        server
            .http_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    if let Some(a) = server.http_addr() {
        eprintln!("web console: http://{a}/console/ (sign in with the operator token)");
    }
    let mut notices = server.notices();
    let console = tokio::spawn(async move {
        loop {
            match notices.recv().await {
                Ok(ServerNotice::Event(e)) => eprintln!("c2: {e:?}"),
                Ok(ServerNotice::Dropped(d)) => eprintln!("c2: {d}"),
                Ok(ServerNotice::ConfidentialData { device, data, .. }) => {
                    eprintln!(
                        "c2: data from {device} (confidential): {} {:?}",
                        data.id, data.value
                    )
                }
                Ok(ServerNotice::Confidential { device, notice }) => {
                    eprintln!("c2: confidential {device}: {notice:?}")
                }
                Ok(ServerNotice::RateLimited { device, refused }) => {
                    eprintln!("c2: {device} over its rate limit ({refused} dropped)")
                }
                Ok(ServerNotice::Published { .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("c2: {n} notices skipped")
                }
                Err(_) => return,
            }
        }
    });
    stop_signal().await;
    eprintln!("stopping");
    server.shutdown().await;
    console.abort();
    Ok(())
}

async fn enroll(a: EnrollArgs) -> Result<()> {
    let (server, token) = operator(&a.op)?;
    let c = Client::new(&server)?.with_operator_token(token);
    let (t, expires) = c
        .create_enrollment(&EnrollmentRequestBody {
            ttl_secs: a.ttl,
            name: a.name,
            groups: a.groups,
        })
        .await?;
    println!("{}", t.as_str());
    eprintln!("one-time enrollment token; expires at {expires} (unix time)");
    Ok(())
}

async fn devices(op: OperatorArgs) -> Result<()> {
    let (server, token) = operator(&op)?;
    let c = Client::new(&server)?.with_operator_token(token);
    for d in c.devices().await? {
        println!(
            "{} {:12} {:8} {} [{}]",
            d.device_id,
            d.status,
            d.alg,
            d.name.unwrap_or_else(|| "-".into()),
            d.groups.join(",")
        );
    }
    Ok(())
}

fn value_of(v: &str, ty: &str) -> Result<ValueBody> {
    Ok(match ty {
        "u64" => ValueBody::U64(v.parse().context("u64 value")?),
        "i64" => ValueBody::I64(v.parse().context("i64 value")?),
        "f64" => ValueBody::F64(v.parse().context("f64 value")?),
        "bool" => ValueBody::Bool(v.parse().context("bool value")?),
        "text" => ValueBody::Text(v.to_string()),
        "hex" => ValueBody::Bytes(b64(&from_hex(v)?)),
        other => bail!("unknown value type {other:?}"),
    })
}

fn print_token(t: &keav_c2::server::api::TokenBody) {
    if t.responses.is_empty() {
        println!("{} {}", t.token, t.outcome);
    }
    for r in &t.responses {
        println!("{} {} {} ({})", t.token, r.device, r.status_name, r.status);
    }
}

async fn wait_for(c: &OperatorClient, sent: &SentBody, secs: u64) -> Result<()> {
    let tokens: Vec<String> = sent.sent.iter().map(|s| s.token.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = c.responses(&tokens).await?;
        let answered = got.iter().filter(|t| !t.responses.is_empty()).count();
        if answered == tokens.len() || Instant::now() >= deadline {
            for t in &got {
                print_token(t);
            }
            eprintln!("{answered} of {} answered", tokens.len());
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_sent(s: &SentBody) {
    for i in &s.sent {
        println!("sent {} token {}", i.device, i.token);
    }
    for i in &s.skipped {
        println!("skipped {}: {}", i.device, i.reason);
    }
}

async fn send(a: SendArgs) -> Result<()> {
    let c = op_client(&a.op)?;
    let mut body = CommandBody {
        device: a.device,
        group: a.group,
        confidential: a.confidential,
        ..Default::default()
    };
    if let Some(id) = a.action {
        body.action = Some(id);
        body.args = a
            .args_hex
            .as_deref()
            .map(from_hex)
            .transpose()?
            .map(|b| b64(&b));
    } else if let Some(id) = a.data {
        body.data_id = Some(id);
        body.value = Some(value_of(a.value.as_deref().unwrap_or(""), &a.value_type)?);
    } else if let Some(g) = a.generic_hex {
        body.generic = Some(b64(&from_hex(&g)?));
    } else {
        bail!("give --action, --data or --generic-hex");
    }
    let sent = c.command(&body).await?;
    print_sent(&sent);
    if let Some(w) = a.wait {
        wait_for(&c, &sent, w).await?;
    }
    Ok(())
}

async fn update(a: UpdateArgs) -> Result<()> {
    let c = op_client(&a.op)?;
    let digest = match (a.digest, a.file) {
        (Some(d), None) => d,
        (None, Some(f)) => {
            let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            to_hex(&Sha256::digest(&bytes))
        }
        _ => bail!("give --digest or --file"),
    };
    let sent = c
        .update(&UpdateBody {
            device: a.device,
            group: a.group,
            url: a.url,
            digest,
        })
        .await?;
    print_sent(&sent);
    if let Some(w) = a.wait {
        wait_for(&c, &sent, w).await?;
    }
    Ok(())
}

/// The CLI device's handlers: commands are printed on stdout and accepted; activated updates
/// are written to DATA/activated/<digest>; observation codes are read from stdin.
struct CliHandlers {
    data: PathBuf,
}

impl Handlers for CliHandlers {
    fn on_action(&mut self, action: u16, args: &[u8]) -> Status {
        println!("action {action} args {}", to_hex(args));
        Status::ActionSuccess
    }
    fn on_data(&mut self, data: &Data, confidential: bool) -> Status {
        let v = match &data.value {
            Value::Text(t) => t.clone(),
            Value::Bytes(b) => to_hex(b),
            other => format!("{other:?}"),
        };
        let mark = if confidential { " (confidential)" } else { "" };
        println!("data {} {v}{mark}", data.id);
        Status::DataSuccess
    }
    fn on_update_verified(&mut self, digest: &[u8; 32], update: &[u8]) {
        println!(
            "update {} verified ({} bytes)",
            to_hex(digest),
            update.len()
        );
    }
    fn on_activate(&mut self, digest: &[u8; 32], update: &[u8]) -> Status {
        let dir = self.data.join("activated");
        match std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(to_hex(digest)), update))
        {
            Ok(()) => {
                println!("update {} activated", to_hex(digest));
                Status::ActivateSuccess
            }
            Err(e) => {
                eprintln!("activation failed: {e}");
                Status::ActivateFail
            }
        }
    }
    fn on_show_words(&mut self, words: &[&'static str]) {
        println!("join words: {}", words.join(" "));
    }
    fn on_present_code(&mut self, code: &JoinCode) {
        println!("observation code: {}", code.words().join(" "));
    }
    fn on_observation(&mut self, joining: DeviceId) -> Option<JoinCode> {
        println!("observe {joining}: type the words it shows, then Enter");
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).ok()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        JoinCode::from_words(&words)
    }
    fn on_joined(&mut self) {
        println!("joined");
    }
    fn on_join_refused(&mut self, status: Status) {
        println!("join refused ({status:?})");
    }
    fn on_terminated(&mut self) {
        println!("terminated (registered again)");
    }
    fn on_deregistered(&mut self) {
        println!("deregistered: identity erased");
    }
}

async fn device(a: DeviceArgs) -> Result<()> {
    let identity = match Identity::load(&a.data)? {
        Some(i) => i,
        None => {
            let service = a
                .identity
                .as_deref()
                .ok_or_else(|| anyhow!("no identity yet: give --identity URL"))?;
            let token = read_secret(
                a.enrollment_token_file.as_deref(),
                "KEAV_C2_ENROLLMENT_TOKEN",
                "enrollment token",
            )?;
            Identity::enroll(&a.data, service, &token, parse_alg(&a.alg)?).await?
        }
    };
    let mut o = AgentOptions::new(StateStore::Dir(a.data.clone()));
    o.broker = a.broker;
    o.require_confidential = a.require_confidential;
    o.reset_state = a.reset_state;
    o.join = match a.join.as_deref() {
        None => None,
        Some("simple") => Some(JoinRequestKind::Simple),
        Some("human") => Some(JoinRequestKind::Human),
        Some(s) => match s.strip_prefix("observed:").and_then(DeviceId::from_hex) {
            Some(observer) => Some(JoinRequestKind::Observed { observer }),
            None => bail!("--join: simple, human or observed:OBSERVER-ID"),
        },
    };
    let id = identity.device_id();
    if a.reset_state {
        eprintln!(
            "device {id}: starting from a fresh state; the operator must run `keav c2 reset {id}`"
        );
    }
    let mut agent = Agent::start(identity, o, CliHandlers { data: a.data })
        .await
        .map_err(|e| agent_failed(id, e))?;
    println!("device {id} {:?}", agent.status());
    tokio::select! {
        _ = stop_signal() => {
            eprintln!("stopping");
            agent.stop().await?;
        }
        r = agent.finished() => r.map_err(|e| agent_failed(id, e))?,
    }
    Ok(())
}

/// Ctrl-C or SIGTERM (so a service manager's stop also stops a broker `serve` started).
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// A clear message for how the agent failed (the process then exits non-zero).
fn agent_failed(id: DeviceId, e: AgentError) -> anyhow::Error {
    match e {
        AgentError::Revoked(why) => {
            anyhow!("device {id} was revoked: the broker refuses its credentials ({why}); it cannot run any more")
        }
        AgentError::Deregistered => anyhow!("device {id} was deregistered: its identity is gone"),
        e => anyhow!("device {id}: {e}"),
    }
}
